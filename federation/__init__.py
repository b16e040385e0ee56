"""Reverie: federated personalization with Flower.

Devices fine-tune the shared weights on their own text and upload 1-bit BitDeltas; the server
validates every update, aggregates robustly (optionally with central DP) and stores the result for
the next sleep. Layout, as in Flower's quickstart:

    task.py        model, recipe and the device's local update (shared by both sides)
    client_app.py  the ClientApp (a device)          server_app.py  the ServerApp
    strategy.py    the Flower strategy: validation -> robust aggregation -> delta store
    validation.py, aggregation.py, wire.py, data.py, attacks.py: plain functions, no Flower

See docs/federation.md for running SuperNodes on real devices.
"""

# A child of Flower's logger: our lines go wherever Flower sends its own (console, `flwr log`,
# the SuperLink's log file) and still propagate to the root logger.
LOGGER_NAME = "flwr.reverie"
