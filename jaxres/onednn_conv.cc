// The 3x3, stride 1, padding 1, float32 or bfloat16 convolution of jaxres's models as oneDNN
// primitives, exposed to XLA as three FFI handlers per type (jaxres/onednn.py builds and loads
// this file; the bfloat16 ones are named with a "Bf16" suffix, all operands bfloat16, oneDNN
// accumulating in float32):
//   JaxresOnednnConvForward(x[N,H,W,Ci], w[3,3,Ci,Co]) -> y[N,H,W,Co]
//   JaxresOnednnConvBackwardData(g[N,H,W,Co], w[3,3,Ci,Co]) -> dx[N,H,W,Ci]
//   JaxresOnednnConvBackwardWeights(x[N,H,W,Ci], g[N,H,W,Co]) -> dw[3,3,Ci,Co]
// Activations stay NHWC (XLA's layout), weights HWIO in XLA and whatever oneDNN prefers inside
// (a reorder per call; the weights are small). The primitives are created once per shape and
// kept. Calls run one at a time (a mutex): each already uses every core through OpenMP, and
// XLA may start the two backward convolutions of a layer at once.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

struct Plan {
  dnnl::memory::desc user_weights;  // HWIO, as XLA holds them
  dnnl::convolution_forward::primitive_desc forward_pd;
  dnnl::convolution_forward forward;
  dnnl::convolution_backward_data::primitive_desc backward_data_pd;
  dnnl::convolution_backward_data backward_data;
  dnnl::convolution_backward_weights::primitive_desc backward_weights_pd;
  dnnl::convolution_backward_weights backward_weights;
};

std::mutex plans_mutex;
std::mutex execute_mutex;

Plan& GetPlan(dt type, int64_t n, int64_t h, int64_t w, int64_t ci, int64_t co) {
  static std::map<std::tuple<dt, int64_t, int64_t, int64_t, int64_t, int64_t>, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(plans_mutex);
  auto key = std::make_tuple(type, n, h, w, ci, co);
  auto found = plans.find(key);
  if (found != plans.end()) return *found->second;
  dnnl::memory::desc src({n, ci, h, w}, type, tag::nhwc);
  dnnl::memory::desc dst({n, co, h, w}, type, tag::nhwc);
  dnnl::memory::desc any_weights({co, ci, 3, 3}, type, tag::any);
  dnnl::memory::dims strides{1, 1}, padding{1, 1};
  auto plan = std::make_unique<Plan>();
  plan->user_weights = dnnl::memory::desc({co, ci, 3, 3}, type, tag::hwio);
  plan->forward_pd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any_weights, dst,
      strides, padding, padding);
  plan->forward = dnnl::convolution_forward(plan->forward_pd);
  plan->backward_data_pd = dnnl::convolution_backward_data::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, padding, padding,
      plan->forward_pd);
  plan->backward_data = dnnl::convolution_backward_data(plan->backward_data_pd);
  plan->backward_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any_weights, dst, strides, padding, padding,
      plan->forward_pd);
  plan->backward_weights = dnnl::convolution_backward_weights(plan->backward_weights_pd);
  Plan& result = *plan;
  plans.emplace(key, std::move(plan));
  return result;
}

// HWIO weights at `data` in the layout `wanted` (a reorder when it is another one).
dnnl::memory WeightsAs(const dnnl::memory::desc& wanted, const Plan& plan, void* data, dnnl::stream& stream) {
  dnnl::memory user(plan.user_weights, Engine(), data);
  if (wanted == plan.user_weights) return user;
  dnnl::memory own(wanted, Engine());
  dnnl::reorder(user, own).execute(stream, user, own);
  return own;
}

// oneDNN's type for an FFI buffer type.
template <ffi::DataType T>
constexpr dt Onednn() {
  static_assert(T == ffi::F32 || T == ffi::BF16, "float32 or bfloat16");
  return T == ffi::F32 ? dt::f32 : dt::bf16;
}

bool Is3x3(ffi::Span<const int64_t> w) { return w.size() == 4 && w[0] == 3 && w[1] == 3; }

// Runs body(stream) on a fresh stream, one call at a time, and waits for it; a oneDNN
// exception becomes an FFI error naming `what`.
template <typename Body>
ffi::Error Execute(const char* what, Body body) {
  try {
    std::lock_guard<std::mutex> lock(execute_mutex);
    dnnl::stream stream(Engine());
    body(stream);
    stream.wait();
  } catch (const std::exception& error) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxres oneDNN ") + what + ": " + error.what());
  }
  return ffi::Error::Success();
}

}  // namespace

template <ffi::DataType T>
static ffi::Error ConvForward(ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::ResultBuffer<T> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || !Is3x3(wd) || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("jaxres oneDNN forward: expects x[N,H,W,Ci] and w[3,3,Ci,Co]");
  return Execute("forward", [&](dnnl::stream& stream) {
    Plan& plan = GetPlan(Onednn<T>(), xd[0], xd[1], xd[2], xd[3], wd[3]);
    dnnl::memory src(plan.forward_pd.src_desc(), Engine(), x.typed_data());
    dnnl::memory dst(plan.forward_pd.dst_desc(), Engine(), y->typed_data());
    dnnl::memory weights = WeightsAs(plan.forward_pd.weights_desc(), plan, w.typed_data(), stream);
    plan.forward.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}});
  });
}

template <ffi::DataType T>
static ffi::Error ConvBackwardData(ffi::Buffer<T> g, ffi::Buffer<T> w, ffi::ResultBuffer<T> dx) {
  auto gd = g.dimensions(), wd = w.dimensions();
  if (gd.size() != 4 || !Is3x3(wd) || wd[3] != gd[3])
    return ffi::Error::InvalidArgument("jaxres oneDNN backward data: expects g[N,H,W,Co] and w[3,3,Ci,Co]");
  return Execute("backward data", [&](dnnl::stream& stream) {
    Plan& plan = GetPlan(Onednn<T>(), gd[0], gd[1], gd[2], wd[2], wd[3]);
    dnnl::memory diff_dst(plan.backward_data_pd.diff_dst_desc(), Engine(), g.typed_data());
    dnnl::memory diff_src(plan.backward_data_pd.diff_src_desc(), Engine(), dx->typed_data());
    dnnl::memory weights = WeightsAs(plan.backward_data_pd.weights_desc(), plan, w.typed_data(), stream);
    plan.backward_data.execute(
        stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DIFF_SRC, diff_src}});
  });
}

template <ffi::DataType T>
static ffi::Error ConvBackwardWeights(ffi::Buffer<T> x, ffi::Buffer<T> g, ffi::ResultBuffer<T> dw) {
  auto xd = x.dimensions(), gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] || xd[2] != gd[2])
    return ffi::Error::InvalidArgument("jaxres oneDNN backward weights: expects x[N,H,W,Ci] and g[N,H,W,Co]");
  return Execute("backward weights", [&](dnnl::stream& stream) {
    Plan& plan = GetPlan(Onednn<T>(), xd[0], xd[1], xd[2], xd[3], gd[3]);
    dnnl::memory src(plan.backward_weights_pd.src_desc(), Engine(), x.typed_data());
    dnnl::memory diff_dst(plan.backward_weights_pd.diff_dst_desc(), Engine(), g.typed_data());
    dnnl::memory user(plan.user_weights, Engine(), dw->typed_data());
    bool same = plan.backward_weights_pd.diff_weights_desc() == plan.user_weights;
    dnnl::memory own = same ? user : dnnl::memory(plan.backward_weights_pd.diff_weights_desc(), Engine());
    plan.backward_weights.execute(
        stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_WEIGHTS, own}});
    if (!same) dnnl::reorder(own, user).execute(stream, own, user);
  });
}

// The three handlers of one type T, named with SUFFIX: every operand and the result of type T.
#define JAXRES_ONEDNN_HANDLERS(SUFFIX, T)                                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvForward##SUFFIX, ConvForward<T>,                 \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<T>>().Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<T>>()); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvBackwardData##SUFFIX, ConvBackwardData<T>,       \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<T>>().Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<T>>()); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxresOnednnConvBackwardWeights##SUFFIX, ConvBackwardWeights<T>, \
                                ffi::Ffi::Bind().Arg<ffi::Buffer<T>>().Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<T>>());

JAXRES_ONEDNN_HANDLERS(, ffi::F32)
JAXRES_ONEDNN_HANDLERS(Bf16, ffi::BF16)

// The oneDNN implementations chosen for one shape and type (bf16 nonzero: bfloat16) ("forward |
// backward data | backward weights"), for the benchmarks' records and jaxres's rules. Returns a
// pointer to a string kept until the next call.
extern "C" const char* JaxresOnednnImplementations(int64_t n, int64_t h, int64_t w, int64_t ci, int64_t co, int64_t bf16) {
  static std::string text;
  try {
    Plan& plan = GetPlan(bf16 ? dt::bf16 : dt::f32, n, h, w, ci, co);
    text = std::string(plan.forward_pd.impl_info_str()) + " | " + plan.backward_data_pd.impl_info_str() + " | " +
           plan.backward_weights_pd.impl_info_str();
  } catch (const std::exception& error) {
    text = std::string("error: ") + error.what();
  }
  return text.c_str();
}
