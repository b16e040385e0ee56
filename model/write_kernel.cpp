// The memory write of model.memory.write_slots for CPU tensors, in place: what
// model/write_kernel.py's Triton program does on CUDA, one (user, instance) at a time.
// Built on first use by torch.utils.cpp_extension (model/fused_write.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
void write_users(torch::Tensor keys, torch::Tensor values, torch::Tensor strengths, torch::Tensor trace_keys,
                 torch::Tensor trace_values, const bool* closes, torch::Tensor w1, torch::Tensor b1,
                 torch::Tensor w2, torch::Tensor b2, const T* sharpness, int64_t topk, T span, T decay,
                 T budget, T threshold, int64_t* writes) {
  auto K = keys.accessor<T, 4>();
  auto V = values.accessor<T, 4>();
  auto S = strengths.accessor<T, 3>();
  auto TK = trace_keys.accessor<T, 3>();
  auto TV = trace_values.accessor<T, 3>();
  auto W1 = w1.accessor<T, 3>();  // (n, hidden, 3)
  auto B1 = b1.accessor<T, 2>();  // (n, hidden)
  auto W2 = w2.accessor<T, 3>();  // (n, 1, hidden)
  auto B2 = b2.accessor<T, 2>();  // (n, 1)
  const int64_t count = keys.size(1), m = keys.size(2), d = keys.size(3), hidden = w1.size(1);
  at::parallel_for(0, keys.size(0), 1, [&](int64_t first, int64_t last) {
    std::vector<T> scores(m), weights(m), ranked(m), renewed(m);
    for (int64_t u = first; u < last; ++u) {
      if (closes != nullptr && !closes[u]) continue;
      for (int64_t i = 0; i < count; ++i) {
        // key = normalize(trace.keys); value = trace.values / span
        T key_sq = 0, value_sq = 0;
        for (int64_t j = 0; j < d; ++j) {
          key_sq += TK[u][i][j] * TK[u][i][j];
          value_sq += TV[u][i][j] * TV[u][i][j];
        }
        const T inv_key_norm = T(1) / std::max(std::sqrt(key_sq), T(1e-12));
        const T value_norm = std::sqrt(value_sq) / span;
        int64_t used = 0;
        T best_used = -1;
        for (int64_t s = 0; s < m; ++s) {
          T dot = 0;
          for (int64_t j = 0; j < d; ++j) dot += K[u][i][s][j] * TK[u][i][j];
          scores[s] = dot * inv_key_norm;
          if (S[u][i][s] > 0) {
            ++used;
            best_used = std::max(best_used, scores[s]);
          }
        }
        // the read: PM's strength-weighted sum, or EM's softmax over its top-k used slots
        if (sharpness == nullptr) {
          for (int64_t s = 0; s < m; ++s) weights[s] = S[u][i][s] * scores[s];
        } else {
          std::fill(weights.begin(), weights.end(), T(0));
          for (int64_t s = 0; s < m; ++s) ranked[s] = S[u][i][s] > 0 ? scores[s] : T(-1e4);
          T top = 0, total = 0;
          for (int64_t k = 0; k < topk; ++k) {
            const int64_t pick = std::max_element(ranked.begin(), ranked.end()) - ranked.begin();
            if (k == 0) top = ranked[pick];
            const T e = std::exp((ranked[pick] - top) * sharpness[i]);
            weights[pick] = S[u][i][pick] > 0 ? e : T(0);
            total += e;
            ranked[pick] = -std::numeric_limits<T>::infinity();
          }
          for (int64_t s = 0; s < m; ++s) weights[s] /= total;
        }
        T miss_sq = 0;
        for (int64_t j = 0; j < d; ++j) {
          T predicted = 0;
          for (int64_t s = 0; s < m; ++s)
            if (weights[s] != 0) predicted += weights[s] * V[u][i][s][j];
          const T miss = TV[u][i][j] / span - predicted;
          miss_sq += miss * miss;
        }
        const T surprise = std::sqrt(miss_sq) / (value_norm + T(1e-6));
        const T novelty = T(1) - std::max(best_used, T(0));
        const T fill = T(used) / T(m);
        // the neuromodulator: sigmoid(w2 @ silu(w1 @ [surprise, novelty, fill] + b1) + b2)
        T out = B2[i][0];
        for (int64_t h = 0; h < hidden; ++h) {
          const T pre = B1[i][h] + W1[i][h][0] * surprise + W1[i][h][1] * novelty + W1[i][h][2] * fill;
          out += W2[i][0][h] * pre / (T(1) + std::exp(-pre));
        }
        const T strength = T(1) / (T(1) + std::exp(-out));
        const bool wrote = strength > threshold;
        // the weakest slot (the first minimum of the decayed strengths) takes the item; budget rescale
        int64_t weakest = 0;
        for (int64_t s = 0; s < m; ++s) {
          renewed[s] = S[u][i][s] * decay;
          if (renewed[s] < renewed[weakest]) weakest = s;
        }
        if (wrote) renewed[weakest] = strength;
        T sum = 0;
        for (int64_t s = 0; s < m; ++s) sum += renewed[s];
        const T scale = std::min(budget / std::max(sum, T(1e-6)), T(1));
        for (int64_t s = 0; s < m; ++s) S[u][i][s] = renewed[s] * scale;
        for (int64_t j = 0; j < d; ++j) {
          if (wrote) {
            K[u][i][weakest][j] = TK[u][i][j] * inv_key_norm;
            V[u][i][weakest][j] = TV[u][i][j] / span;
          }
          TK[u][i][j] = 0;  // close_spans empties the trace
          TV[u][i][j] = 0;
        }
        writes[u] += wrote;
      }
    }
  });
}

}  // namespace

torch::Tensor write_slots_in_place(torch::Tensor keys, torch::Tensor values, torch::Tensor strengths,
                                   torch::Tensor trace_keys, torch::Tensor trace_values,
                                   c10::optional<torch::Tensor> closes, torch::Tensor w1, torch::Tensor b1,
                                   torch::Tensor w2, torch::Tensor b2, c10::optional<torch::Tensor> sharpness,
                                   int64_t topk, double span, double decay, double budget, double threshold) {
  auto writes = torch::zeros({keys.size(0)}, torch::kLong);
  auto mask = closes.has_value() ? closes->to(torch::kBool).contiguous() : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(keys.scalar_type(), "write_slots_in_place", [&] {
    auto rule = [&](const torch::Tensor& t) { return t.to(keys.scalar_type()).contiguous(); };
    auto sharp = sharpness.has_value() ? rule(*sharpness) : torch::Tensor();
    write_users<scalar_t>(keys, values, strengths, trace_keys, trace_values,
                          mask.defined() ? mask.data_ptr<bool>() : nullptr, rule(w1), rule(b1), rule(w2), rule(b2),
                          sharp.defined() ? sharp.data_ptr<scalar_t>() : nullptr, topk, scalar_t(span),
                          scalar_t(decay), scalar_t(budget), scalar_t(threshold), writes.data_ptr<int64_t>());
  });
  return writes;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("write_slots_in_place", &write_slots_in_place, "model.memory.write_slots in place, for CPU tensors");
}
