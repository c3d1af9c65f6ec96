// The Node binding of the native core. No logic of its own: it converts arguments, runs the slow calls
// (loading a model, a denoising step) on the libuv pool with a promise per call, and turns every native
// failure into a JS Error whose `code` is "VDIFF_<NAME>". src/engine/native.ts describes it in TypeScript.
//
//   loadModel(dir, {device?, threads?, kvCacheDtype?, kvCacheBudgetBytes?, prefixCacheBytes?, prefillChunk?,
//                   packWeightsMaxBytes?, gpuMemoryUtilization?, quantize?, cpuIsa?}) -> Promise<NativeEngine>
//   NativeEngine: info() create(prompt, params, suffix?, template?) step(ids, cancel?) score(canvas, positions,
//   targets) scoreBatch([{canvas, positions, targets, topLogprobs?, rank?}, ...])
//                 (info().family: the model family; step results: phase, provisional, positionsComputed,
//                 promptCached)
//                 release(id) canvas(id) sequenceInfo(id) live() kvCacheBytes() prefixCache()
//   CancelToken: cancel() cancelled
//   cudaDevices() -> number of visible GPUs (0 without the CUDA build, a driver or a GPU)
#include <napi.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/weights.h"

namespace {

using vdiff::Engine;
using vdiff::ErrorCode;

struct AddonData {
  Napi::FunctionReference engine_constructor;
  Napi::FunctionReference cancel_constructor;
};

// ---- errors ---------------------------------------------------------------------------------------

struct Failure {
  std::string code;  // without the VDIFF_ prefix
  std::string message;
  std::string param;  // the setting or input at fault (vdiff::Error::param), empty when none
};

Failure describe(std::exception_ptr failure) {
  try {
    std::rethrow_exception(failure);
  } catch (const vdiff::Error& e) {
    return {vdiff::error_code_name(e.code()), e.what(), e.param()};
  } catch (const std::bad_alloc&) {
    return {"OUT_OF_MEMORY", "out of memory"};
  } catch (const std::exception& e) {
    return {"INTERNAL", e.what()};
  } catch (...) {
    return {"INTERNAL", "unknown native failure"};
  }
}

Napi::Error js_error(Napi::Env env, const Failure& f) {
  Napi::Error error = Napi::Error::New(env, f.message);
  error.Set("code", Napi::String::New(env, "VDIFF_" + f.code));
  if (!f.param.empty()) error.Set("param", Napi::String::New(env, f.param));
  return error;
}

Napi::Error invalid_argument(Napi::Env env, const std::string& message) {
  return js_error(env, {vdiff::error_code_name(ErrorCode::InvalidArgument), message});
}

// Runs fn on the JS thread; native failures become JS exceptions with a code.
template <typename F>
auto guarded(Napi::Env env, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;  // already a JS error (argument checks, N-API failures)
  } catch (...) {
    throw js_error(env, describe(std::current_exception()));
  }
}

Napi::Promise rejected(Napi::Env env, const Napi::Error& error) {
  auto deferred = Napi::Promise::Deferred::New(env);
  deferred.Reject(error.Value());
  return deferred.Promise();
}

// ---- argument conversion --------------------------------------------------------------------------

int64_t integer_of(Napi::Env env, const Napi::Value& v, const std::string& name, int64_t min, int64_t max) {
  if (!v.IsNumber()) throw invalid_argument(env, name + " must be an integer");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || std::floor(d) != d) throw invalid_argument(env, name + " must be an integer");
  if (d < static_cast<double>(min) || d > static_cast<double>(max))
    throw invalid_argument(env, name + " is out of range [" + std::to_string(min) + ", " + std::to_string(max) + "]");
  return static_cast<int64_t>(d);
}

constexpr int64_t kMaxSafeInteger = 9007199254740991LL;  // Number.MAX_SAFE_INTEGER

uint64_t id_of(Napi::Env env, const Napi::Value& v, const std::string& name) {
  return static_cast<uint64_t>(integer_of(env, v, name, 0, kMaxSafeInteger));
}

// Token ids of a prompt or suffix (`name` says which, for errors).
std::vector<int32_t> tokens_of(Napi::Env env, const Napi::Value& v, const std::string& name) {
  if (v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_int32_array) {
    auto array = v.As<Napi::Int32Array>();
    return std::vector<int32_t>(array.Data(), array.Data() + array.ElementLength());
  }
  if (!v.IsArray()) throw invalid_argument(env, name + " must be an Int32Array or an array of token ids");
  auto array = v.As<Napi::Array>();
  std::vector<int32_t> tokens(array.Length());
  for (uint32_t i = 0; i < array.Length(); ++i)
    tokens[i] =
        static_cast<int32_t>(integer_of(env, array.Get(i), name + "[" + std::to_string(i) + "]", INT32_MIN, INT32_MAX));
  return tokens;
}

Napi::Value field(Napi::Env env, const Napi::Object& o, const char* name, bool required) {
  Napi::Value v = o.Get(name);
  if (required && v.IsUndefined()) throw invalid_argument(env, std::string("params.") + name + " is required");
  return v;
}

vdiff::SamplingParams params_of(Napi::Env env, const Napi::Value& v) {
  if (!v.IsObject()) throw invalid_argument(env, "params must be an object");
  const Napi::Object o = v.As<Napi::Object>();
  vdiff::SamplingParams p;
  auto int_field = [&](const char* name) {
    return static_cast<int>(
        integer_of(env, field(env, o, name, true), std::string("params.") + name, INT32_MIN, INT32_MAX));
  };
  auto number_field = [&](const char* name) {
    Napi::Value x = field(env, o, name, true);
    if (!x.IsNumber()) throw invalid_argument(env, std::string("params.") + name + " must be a number");
    return x.As<Napi::Number>().DoubleValue();
  };
  auto bool_field = [&](const char* name) {
    Napi::Value x = field(env, o, name, false);
    if (x.IsUndefined()) return false;
    if (!x.IsBoolean()) throw invalid_argument(env, std::string("params.") + name + " must be a boolean");
    return x.As<Napi::Boolean>().Value();
  };
  // Optional numbers: absent or null leave the default (the option off); ranges are checked natively.
  auto optional_number = [&](const char* name, double fallback) {
    Napi::Value x = field(env, o, name, false);
    if (x.IsUndefined() || x.IsNull()) return fallback;
    if (!x.IsNumber()) throw invalid_argument(env, std::string("params.") + name + " must be a number");
    return x.As<Napi::Number>().DoubleValue();
  };
  p.gen_length = int_field("genLength");
  p.block_length = int_field("blockLength");
  p.steps = int_field("steps");
  p.temperature = number_field("temperature");
  p.cfg_scale = number_field("cfgScale");

  const Napi::Value remasking = field(env, o, "remasking", true);
  const std::string r = remasking.IsString() ? remasking.As<Napi::String>().Utf8Value() : "";
  if (r == "low_confidence") p.remasking = vdiff::Remasking::LowConfidence;
  else if (r == "random") p.remasking = vdiff::Remasking::Random;
  else throw invalid_argument(env, "params.remasking must be \"low_confidence\" or \"random\"");

  const Napi::Value seed = field(env, o, "seed", true);
  if (seed.IsBigInt()) {
    bool lossless = false;
    p.seed = seed.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw invalid_argument(env, "params.seed must fit in 64 unsigned bits");
  } else {
    p.seed = static_cast<uint64_t>(integer_of(env, seed, "params.seed", 0, kMaxSafeInteger));
  }

  p.logits_eos_inf = bool_field("logitsEosInf");
  p.confidence_eos_eot_inf = bool_field("confidenceEosEotInf");
  const Napi::Value eot = field(env, o, "eotTokenId", false);
  p.eot_token_id = eot.IsUndefined() || eot.IsNull()
                       ? -1
                       : static_cast<int>(integer_of(env, eot, "params.eotTokenId", -1, INT32_MAX));
  const Napi::Value top_k = field(env, o, "topK", false);
  p.top_k = top_k.IsUndefined() || top_k.IsNull()
                ? 0
                : static_cast<int>(integer_of(env, top_k, "params.topK", INT32_MIN, INT32_MAX));
  const Napi::Value min_tokens = field(env, o, "minTokens", false);
  p.min_tokens = min_tokens.IsUndefined() || min_tokens.IsNull()
                     ? 0
                     : static_cast<int>(integer_of(env, min_tokens, "params.minTokens", INT32_MIN, INT32_MAX));
  p.ignore_eos = bool_field("ignoreEos");
  const Napi::Value stops = field(env, o, "stopTokenIds", false);
  if (!stops.IsUndefined() && !stops.IsNull()) p.stop_token_ids = tokens_of(env, stops, "params.stopTokenIds");
  const Napi::Value ends = field(env, o, "endTokenIds", false);
  if (!ends.IsUndefined() && !ends.IsNull()) p.end_token_ids = tokens_of(env, ends, "params.endTokenIds");
  const Napi::Value allowed = field(env, o, "allowedTokenIds", false);
  if (!allowed.IsUndefined() && !allowed.IsNull())
    p.allowed_token_ids = tokens_of(env, allowed, "params.allowedTokenIds");
  // positionAllowed: per answer position a set's index or -1; allowedSets: arrays of token ids.
  const Napi::Value positions = field(env, o, "positionAllowed", false);
  if (!positions.IsUndefined() && !positions.IsNull())
    p.position_allowed = tokens_of(env, positions, "params.positionAllowed");
  const Napi::Value sets = field(env, o, "allowedSets", false);
  if (!sets.IsUndefined() && !sets.IsNull()) {
    if (!sets.IsArray()) throw invalid_argument(env, "params.allowedSets must be an array of arrays of token ids");
    const Napi::Array list = sets.As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); ++i)
      p.allowed_sets.push_back(tokens_of(env, list.Get(i), "params.allowedSets[" + std::to_string(i) + "]"));
  }
  // logitBias: [[token, bias], ...] (the engine checks the ranges).
  const Napi::Value bias = field(env, o, "logitBias", false);
  if (!bias.IsUndefined() && !bias.IsNull()) {
    const std::string what = "params.logitBias must be an array of [token id, bias] pairs";
    if (!bias.IsArray()) throw invalid_argument(env, what);
    const Napi::Array pairs = bias.As<Napi::Array>();
    for (uint32_t i = 0; i < pairs.Length(); ++i) {
      const Napi::Value pair = pairs.Get(i);
      if (!pair.IsArray() || pair.As<Napi::Array>().Length() != 2) throw invalid_argument(env, what);
      const Napi::Value id = pair.As<Napi::Array>().Get(0u), value = pair.As<Napi::Array>().Get(1u);
      if (!value.IsNumber()) throw invalid_argument(env, what);
      p.logit_bias.emplace_back(static_cast<int32_t>(integer_of(
                                    env, id, "params.logitBias[" + std::to_string(i) + "][0]", INT32_MIN, INT32_MAX)),
                                static_cast<float>(value.As<Napi::Number>().DoubleValue()));
    }
  }
  p.top_p = optional_number("topP", 1.0);
  p.min_p = optional_number("minP", 0.0);
  p.presence_penalty = optional_number("presencePenalty", 0.0);
  p.frequency_penalty = optional_number("frequencyPenalty", 0.0);
  p.repetition_penalty = optional_number("repetitionPenalty", 1.0);
  p.parallel_threshold = optional_number("parallelThreshold", 0.0);
  p.parallel_factor = optional_number("parallelFactor", 0.0);
  p.early_stop = bool_field("earlyStop");
  const Napi::Value kv_cache = field(env, o, "kvCache", false);
  if (!kv_cache.IsUndefined() && !kv_cache.IsNull()) {
    const std::string mode = kv_cache.IsString() ? kv_cache.As<Napi::String>().Utf8Value() : "";
    if (mode == "none") p.kv_cache = vdiff::KVCacheMode::None;
    else if (mode == "prefix") p.kv_cache = vdiff::KVCacheMode::Prefix;
    else if (mode == "dual") p.kv_cache = vdiff::KVCacheMode::Dual;
    else throw invalid_argument(env, "params.kvCache must be \"none\", \"prefix\" or \"dual\"");
  }
  const Napi::Value refresh = field(env, o, "kvRefreshInterval", false);
  const Napi::Value top_logprobs = field(env, o, "topLogprobs", false);
  p.top_logprobs = top_logprobs.IsUndefined() || top_logprobs.IsNull()
                       ? 0
                       : static_cast<int>(integer_of(env, top_logprobs, "params.topLogprobs", INT32_MIN, INT32_MAX));
  p.kv_refresh_interval =
      refresh.IsUndefined() || refresh.IsNull()
          ? 0
          : static_cast<int>(integer_of(env, refresh, "params.kvRefreshInterval", INT32_MIN, INT32_MAX));
  // Block decoding, LLaDA2.1 editing: absent or null is off (-1) and the reference's 16.
  p.editing_threshold = optional_number("editingThreshold", -1.0);
  const Napi::Value post = field(env, o, "maxPostSteps", false);
  p.max_post_steps = post.IsUndefined() || post.IsNull()
                         ? 16
                         : static_cast<int>(integer_of(env, post, "params.maxPostSteps", INT32_MIN, INT32_MAX));
  // Dream decoding: absent or null is entropy, 0 and 1e-3 (the engine checks the ranges).
  const Napi::Value alg = field(env, o, "alg", false);
  if (!alg.IsUndefined() && !alg.IsNull()) {
    const std::string name = alg.IsString() ? alg.As<Napi::String>().Utf8Value() : "";
    if (name == "origin") p.alg = vdiff::DreamAlg::Origin;
    else if (name == "maskgit_plus") p.alg = vdiff::DreamAlg::MaskgitPlus;
    else if (name == "topk_margin") p.alg = vdiff::DreamAlg::TopkMargin;
    else if (name == "entropy") p.alg = vdiff::DreamAlg::Entropy;
    else
      throw js_error(env, {vdiff::error_code_name(ErrorCode::InvalidArgument),
                           "params.alg must be \"origin\", \"maskgit_plus\", \"topk_margin\" or \"entropy\"", "alg"});
  }
  p.alg_temp = optional_number("algTemp", 0.0);
  p.eps = optional_number("eps", 1e-3);
  return p;
}

// ---- promise workers ------------------------------------------------------------------------------

// An AsyncWorker settling a promise: run() on the libuv pool, result() back on the JS thread.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, const char* name)
      : Napi::AsyncWorker(env, name), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise promise() const { return deferred_.Promise(); }

 protected:
  virtual void run() = 0;
  virtual Napi::Value result(Napi::Env env) = 0;

 private:
  void Execute() override {
    try {
      run();
    } catch (...) {
      failure_ = describe(std::current_exception());
      SetError(failure_.message.empty() ? failure_.code : failure_.message);  // non-empty: routes to OnError
    }
  }
  void OnOK() override {
    Napi::Env env = Env();
    try {
      deferred_.Resolve(result(env));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (...) {
      deferred_.Reject(js_error(env, describe(std::current_exception())).Value());
    }
  }
  void OnError(const Napi::Error&) override { deferred_.Reject(js_error(Env(), failure_).Value()); }

  Napi::Promise::Deferred deferred_;
  Failure failure_;
};

class LoadWorker : public PromiseWorker {
 public:
  // on_progress (may be empty): called on the JS thread as (bytesDone, bytesTotal) while a device backend
  // uploads the weights.
  LoadWorker(Napi::Env env, std::string dir, vdiff::LoadOptions options, vdiff::EngineOptions engine_options,
             Napi::Function on_progress)
      : PromiseWorker(env, "vdiff.loadModel"),
        dir_(std::move(dir)),
        options_(options),
        engine_options_(engine_options) {
    if (on_progress.IsEmpty()) return;
    progress_ = Napi::ThreadSafeFunction::New(env, on_progress, "vdiff.loadModel.progress", 0, 1);
    options_.progress = [](void* context, uint64_t done, uint64_t total) {
      auto* tsfn = static_cast<Napi::ThreadSafeFunction*>(context);
      tsfn->NonBlockingCall([done, total](Napi::Env env, Napi::Function callback) {
        callback.Call(
            {Napi::Number::New(env, static_cast<double>(done)), Napi::Number::New(env, static_cast<double>(total))});
      });
    };
    options_.progress_context = &progress_;
  }
  ~LoadWorker() override {
    if (progress_) progress_.Release();
  }

 private:
  void run() override { engine_ = std::make_shared<Engine>(vdiff::Backend::load(dir_, options_), engine_options_); }
  Napi::ThreadSafeFunction progress_;
  Napi::Value result(Napi::Env env) override {
    AddonData* data = env.GetInstanceData<AddonData>();
    return data->engine_constructor.New({Napi::External<std::shared_ptr<Engine>>::New(env, &engine_)});
  }

  std::string dir_;
  vdiff::LoadOptions options_;
  vdiff::EngineOptions engine_options_;
  std::shared_ptr<Engine> engine_;
};

const char* reason_name(vdiff::FinishReason r) {
  return r == vdiff::FinishReason::Eos ? "eos" : r == vdiff::FinishReason::Length ? "length" : nullptr;
}

// A position's likeliest tokens as [{token, logprob}, ...].
Napi::Array top_of(Napi::Env env, const std::vector<vdiff::TopLogprob>& top) {
  Napi::Array array = Napi::Array::New(env, top.size());
  for (size_t k = 0; k < top.size(); ++k) {
    Napi::Object alt = Napi::Object::New(env);
    alt.Set("token", top[k].token);
    alt.Set("logprob", static_cast<double>(top[k].logprob));
    array.Set(static_cast<uint32_t>(k), alt);
  }
  return array;
}

class ScoreWorker : public PromiseWorker {
 public:
  ScoreWorker(Napi::Env env, std::shared_ptr<Engine> engine, std::vector<int32_t> canvas,
              std::vector<int32_t> positions, std::vector<int32_t> targets)
      : PromiseWorker(env, "vdiff.score"),
        engine_(std::move(engine)),
        canvas_(std::move(canvas)),
        positions_(std::move(positions)),
        targets_(std::move(targets)) {}

 private:
  void run() override { scores_ = engine_->score(canvas_, positions_, targets_); }
  Napi::Value result(Napi::Env env) override {
    auto out = Napi::Float64Array::New(env, scores_.size());
    for (size_t i = 0; i < scores_.size(); ++i) out[i] = scores_[i];
    return out;
  }

  std::shared_ptr<Engine> engine_;
  std::vector<int32_t> canvas_, positions_, targets_;
  std::vector<double> scores_;
};

class ScoreBatchWorker : public PromiseWorker {
 public:
  ScoreBatchWorker(Napi::Env env, std::shared_ptr<Engine> engine, std::vector<Engine::ScoreItem> items)
      : PromiseWorker(env, "vdiff.scoreBatch"), engine_(std::move(engine)), items_(std::move(items)) {}

 private:
  void run() override { scores_ = engine_->score(items_); }
  Napi::Value result(Napi::Env env) override {
    Napi::Array out = Napi::Array::New(env, scores_.size());
    for (size_t i = 0; i < scores_.size(); ++i) {
      const Engine::Scored& scored = scores_[i];
      auto logprobs = Napi::Float64Array::New(env, scored.logprobs.size());
      for (size_t j = 0; j < scored.logprobs.size(); ++j) logprobs[j] = scored.logprobs[j];
      Napi::Array top = Napi::Array::New(env, scored.top.size());
      for (size_t j = 0; j < scored.top.size(); ++j) top.Set(static_cast<uint32_t>(j), top_of(env, scored.top[j]));
      Napi::Object item = Napi::Object::New(env);
      item.Set("logprobs", logprobs);
      item.Set("top", top);
      auto ranks = Napi::Int32Array::New(env, scored.ranks.size());
      for (size_t j = 0; j < scored.ranks.size(); ++j) ranks[j] = scored.ranks[j];
      item.Set("ranks", ranks);
      out.Set(static_cast<uint32_t>(i), item);
    }
    return out;
  }

  std::shared_ptr<Engine> engine_;
  std::vector<Engine::ScoreItem> items_;
  std::vector<Engine::Scored> scores_;
};

const char* phase_name(vdiff::Phase p) {
  return p == vdiff::Phase::Prefill ? "prefill" : p == vdiff::Phase::Commit ? "commit" : "denoise";
}

Napi::Array tokens_array(Napi::Env env, const std::vector<vdiff::CommittedToken>& tokens) {
  Napi::Array array = Napi::Array::New(env, tokens.size());
  for (size_t j = 0; j < tokens.size(); ++j) {
    const vdiff::CommittedToken& t = tokens[j];
    Napi::Object c = Napi::Object::New(env);
    c.Set("position", t.position);
    c.Set("token", t.token);
    c.Set("probability", static_cast<double>(t.probability));
    if (!t.top.empty()) {
      c.Set("top", top_of(env, t.top));
    }
    array.Set(static_cast<uint32_t>(j), c);
  }
  return array;
}

class StepWorker : public PromiseWorker {
 public:
  StepWorker(Napi::Env env, std::shared_ptr<Engine> engine, Engine::Pinned sequences,
             std::shared_ptr<std::atomic<bool>> cancel)
      : PromiseWorker(env, "vdiff.step"),
        engine_(std::move(engine)),
        sequences_(std::move(sequences)),
        cancel_(std::move(cancel)) {}

 private:
  void run() override { outputs_ = engine_->step_pinned(sequences_, cancel_.get()); }
  Napi::Value result(Napi::Env env) override {
    Napi::Array results = Napi::Array::New(env, outputs_.size());
    for (size_t i = 0; i < outputs_.size(); ++i) {
      const vdiff::StepOutput& out = outputs_[i];
      Napi::Array committed = tokens_array(env, out.committed);
      Napi::Object o = Napi::Object::New(env);
      o.Set("id", Napi::Number::New(env, static_cast<double>(out.id)));
      o.Set("committed", committed);
      o.Set("finished", Napi::Boolean::New(env, out.finished));
      const char* reason = reason_name(out.reason);
      o.Set("reason", reason ? Napi::Value(Napi::String::New(env, reason)) : env.Null());
      o.Set("block", Napi::Number::New(env, out.block));
      o.Set("stepsDone", Napi::Number::New(env, out.steps_done));
      o.Set("stepsTotal", Napi::Number::New(env, out.steps_total));
      o.Set("filled", Napi::Number::New(env, out.filled));
      o.Set("forwardPasses", Napi::Number::New(env, out.forward_passes));
      o.Set("kvRefreshes", Napi::Number::New(env, out.kv_refreshes));
      o.Set("phase", Napi::String::New(env, phase_name(out.phase)));
      o.Set("provisional", tokens_array(env, out.provisional));
      o.Set("positionsComputed", Napi::Number::New(env, static_cast<double>(out.positions_computed)));
      o.Set("promptCached", Napi::Number::New(env, out.prompt_cached));
      results.Set(static_cast<uint32_t>(i), o);
    }
    return results;
  }

  std::shared_ptr<Engine> engine_;  // keeps the engine (and the sequences' model) alive during the step
  // Looked up when step() was called, so a release() before the worker runs does not pull them away.
  Engine::Pinned sequences_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  std::vector<vdiff::StepOutput> outputs_;
};

// ---- CancelToken ----------------------------------------------------------------------------------

class CancelToken : public Napi::ObjectWrap<CancelToken> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(
        env, "CancelToken",
        {InstanceMethod<&CancelToken::cancel>("cancel"), InstanceAccessor<&CancelToken::cancelled>("cancelled")});
  }
  explicit CancelToken(const Napi::CallbackInfo& info)
      : Napi::ObjectWrap<CancelToken>(info), flag_(std::make_shared<std::atomic<bool>>(false)) {}

  // Shared with every step that uses the token, so it outlives a collected JS object.
  std::shared_ptr<std::atomic<bool>> flag() const { return flag_; }

 private:
  void cancel(const Napi::CallbackInfo&) { flag_->store(true); }
  Napi::Value cancelled(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), flag_->load()); }

  std::shared_ptr<std::atomic<bool>> flag_;
};

// ---- NativeEngine ---------------------------------------------------------------------------------

class NativeEngine : public Napi::ObjectWrap<NativeEngine> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(
        env, "NativeEngine",
        {InstanceMethod<&NativeEngine::info>("info"), InstanceMethod<&NativeEngine::create>("create"),
         InstanceMethod<&NativeEngine::step>("step"), InstanceMethod<&NativeEngine::score>("score"),
         InstanceMethod<&NativeEngine::score_batch>("scoreBatch"), InstanceMethod<&NativeEngine::release>("release"),
         InstanceMethod<&NativeEngine::canvas>("canvas"), InstanceMethod<&NativeEngine::sequence_info>("sequenceInfo"),
         InstanceMethod<&NativeEngine::live>("live"), InstanceMethod<&NativeEngine::kv_cache_bytes>("kvCacheBytes"),
         InstanceMethod<&NativeEngine::prefix_cache>("prefixCache")});
  }

  explicit NativeEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeEngine>(info) {
    if (info.Length() != 1 || !info[0].IsExternal())
      throw invalid_argument(info.Env(), "NativeEngine is created by loadModel()");
    engine_ = *info[0].As<Napi::External<std::shared_ptr<Engine>>>().Data();
  }

 private:
  Napi::Value info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const vdiff::Backend& model = engine_->backend();
    const vdiff::ModelConfig& c = model.config();
    Napi::Object config = Napi::Object::New(env);
    config.Set("dModel", c.d_model);
    config.Set("nHeads", c.n_heads);
    config.Set("nKvHeads", c.n_kv_heads);
    config.Set("nLayers", c.n_layers);
    config.Set("mlpHiddenSize", c.mlp_hidden_size);
    config.Set("vocabSize", c.vocab_size);
    config.Set("embeddingSize", c.embedding_size);
    config.Set("maskTokenId", c.mask_token_id);
    config.Set("eosTokenId", c.eos_token_id);
    config.Set("maxSequenceLength", c.max_sequence_length);
    config.Set("ropeTheta", c.rope_theta);
    config.Set("rmsNormEps", c.rms_norm_eps);
    config.Set("weightTying", c.weight_tying);
    config.Set("includeBias", c.include_bias);
    // The family: what the serving side picks its defaults by and refuses settings with.
    Napi::Object family = Napi::Object::New(env);
    family.Set("name", c.model_type);
    family.Set("decoding", c.decoding == vdiff::Decoding::Block   ? "block"
                           : c.decoding == vdiff::Decoding::Dream ? "dream"
                                                                  : "full_canvas");
    family.Set("blockLength", c.decoding == vdiff::Decoding::Block ? c.block_length : 0);
    family.Set("editing", guarded(env, [&] { return vdiff::family_of(c).editing; }));
    family.Set("maskTokenId", c.mask_token_id);
    family.Set("eosTokenId", c.eos_token_id);
    Napi::Array stops = Napi::Array::New(env, c.stop_token_ids.size());
    for (size_t i = 0; i < c.stop_token_ids.size(); ++i) stops.Set(static_cast<uint32_t>(i), c.stop_token_ids[i]);
    family.Set("stopTokenIds", stops);
    Napi::Object o = Napi::Object::New(env);
    o.Set("config", config);
    o.Set("family", family);
    const vdiff::BackendInfo backend = model.info();
    o.Set("backend", backend.backend);
    o.Set("device", backend.device);
    o.Set("gemm", backend.gemm);
    o.Set("memoryUsedBytes", static_cast<double>(backend.memory_used));
    o.Set("memoryTotalBytes", static_cast<double>(backend.memory_total));
    o.Set("weightDtype", model.weight_dtype());
    o.Set("parameterCount", static_cast<double>(model.parameter_count()));
    o.Set("weightBytes", static_cast<double>(model.weight_bytes()));
    o.Set("packedWeightBytes", static_cast<double>(model.packed_weight_bytes()));
    o.Set("kvCacheBytesPerPosition", static_cast<double>(model.kv_cache_bytes(1)));
    o.Set("kvCacheBudgetBytes", static_cast<double>(model.kv_cache_budget_bytes()));
    o.Set("prefixCacheBytes", static_cast<double>(engine_->prefix_cache_stats().capacity_bytes));
    const std::vector<std::string>& unused = model.unused_tensors();
    Napi::Array unused_names = Napi::Array::New(env, unused.size());
    for (size_t i = 0; i < unused.size(); ++i) unused_names.Set(static_cast<uint32_t>(i), unused[i]);
    o.Set("unusedTensors", unused_names);
    return o;
  }

  Napi::Value create(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::vector<int32_t> prompt = tokens_of(env, info[0], "prompt");
    const vdiff::SamplingParams params = params_of(env, info[1]);
    const std::vector<int32_t> suffix = info.Length() > 2 && !info[2].IsUndefined() && !info[2].IsNull()
                                            ? tokens_of(env, info[2], "suffix")
                                            : std::vector<int32_t>();
    const std::vector<int32_t> answer_template = info.Length() > 3 && !info[3].IsUndefined() && !info[3].IsNull()
                                                     ? tokens_of(env, info[3], "template")
                                                     : std::vector<int32_t>();
    const uint64_t id = guarded(env, [&] { return engine_->create(prompt, params, suffix, answer_template); });
    return Napi::Number::New(env, static_cast<double>(id));
  }

  Napi::Value step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      if (!info[0].IsArray()) throw invalid_argument(env, "ids must be an array of sequence ids");
      const Napi::Array array = info[0].As<Napi::Array>();
      std::vector<uint64_t> ids(array.Length());
      for (uint32_t i = 0; i < array.Length(); ++i) ids[i] = id_of(env, array.Get(i), "ids[" + std::to_string(i) + "]");
      std::shared_ptr<std::atomic<bool>> cancel;
      if (info.Length() > 1 && !info[1].IsUndefined() && !info[1].IsNull()) {
        const Napi::Function token_class = env.GetInstanceData<AddonData>()->cancel_constructor.Value();
        if (!info[1].IsObject() || !info[1].As<Napi::Object>().InstanceOf(token_class))
          throw invalid_argument(env, "cancel must be a CancelToken");
        cancel = CancelToken::Unwrap(info[1].As<Napi::Object>())->flag();
      }
      Engine::Pinned sequences = guarded(env, [&] { return engine_->pin(ids); });
      auto* worker = new StepWorker(env, engine_, std::move(sequences), std::move(cancel));
      Napi::Promise promise = worker->promise();
      worker->Queue();
      return promise;
    } catch (const Napi::Error& e) {
      return rejected(env, e);
    }
  }

  Napi::Value score(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      auto* worker = new ScoreWorker(env, engine_, tokens_of(env, info[0], "canvas"),
                                     tokens_of(env, info[1], "positions"), tokens_of(env, info[2], "targets"));
      Napi::Promise promise = worker->promise();
      worker->Queue();
      return promise;
    } catch (const Napi::Error& e) {
      return rejected(env, e);
    }
  }

  Napi::Value score_batch(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    try {
      if (!info[0].IsArray()) throw invalid_argument(env, "items must be an array");
      Napi::Array list = info[0].As<Napi::Array>();
      std::vector<Engine::ScoreItem> items(list.Length());
      for (uint32_t i = 0; i < list.Length(); ++i) {
        const std::string name = "items[" + std::to_string(i) + "]";
        Napi::Value v = list.Get(i);
        if (!v.IsObject()) throw invalid_argument(env, name + " must be an object");
        Napi::Object o = v.As<Napi::Object>();
        items[i] = {tokens_of(env, o.Get("canvas"), name + ".canvas"),
                    tokens_of(env, o.Get("positions"), name + ".positions"),
                    tokens_of(env, o.Get("targets"), name + ".targets")};
        const Napi::Value top = o.Get("topLogprobs");
        if (!top.IsUndefined() && !top.IsNull())
          items[i].top_logprobs =
              static_cast<int>(integer_of(env, top, name + ".topLogprobs", 0, vdiff::kMaxTopLogprobs));
        items[i].rank = o.Get("rank").ToBoolean().Value();
      }
      auto* worker = new ScoreBatchWorker(env, engine_, std::move(items));
      Napi::Promise promise = worker->promise();
      worker->Queue();
      return promise;
    } catch (const Napi::Error& e) {
      return rejected(env, e);
    }
  }

  Napi::Value kv_cache_bytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(engine_->backend().kv_cache_live_bytes()));
  }

  Napi::Value prefix_cache(const Napi::CallbackInfo& info) {
    const vdiff::PrefixCacheStats s = engine_->prefix_cache_stats();
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("capacityBytes", static_cast<double>(s.capacity_bytes));
    o.Set("bytes", static_cast<double>(s.bytes));
    o.Set("entries", s.entries);
    o.Set("lookups", static_cast<double>(s.lookups));
    o.Set("hits", static_cast<double>(s.hits));
    o.Set("hitPositions", static_cast<double>(s.hit_positions));
    o.Set("inserts", static_cast<double>(s.inserts));
    o.Set("evictions", static_cast<double>(s.evictions));
    return o;
  }

  Napi::Value release(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const uint64_t id = id_of(env, info[0], "id");
    guarded(env, [&] { engine_->release(id); });
    return env.Undefined();
  }

  Napi::Value canvas(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const uint64_t id = id_of(env, info[0], "id");
    const std::vector<int32_t> tokens = guarded(env, [&] { return engine_->canvas(id); });
    auto array = Napi::Int32Array::New(env, tokens.size());
    std::copy(tokens.begin(), tokens.end(), array.Data());
    return array;
  }

  Napi::Value sequence_info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const uint64_t id = id_of(env, info[0], "id");
    const vdiff::SequenceInfo s = guarded(env, [&] { return engine_->info(id); });
    Napi::Object o = Napi::Object::New(env);
    o.Set("promptLength", s.prompt_length);
    o.Set("genLength", s.gen_length);
    o.Set("suffixLength", s.suffix_length);
    o.Set("stepsTotal", s.steps_total);
    o.Set("stepsDone", s.steps_done);
    o.Set("finished", s.finished);
    o.Set("memoryBytes", static_cast<double>(s.memory_bytes));
    o.Set("forwardPasses", s.forward_passes);
    o.Set("tokensDenoised", s.tokens_denoised);
    o.Set("kvRefreshes", s.kv_refreshes);
    o.Set("kvCacheBytes", static_cast<double>(s.kv_cache_bytes));
    o.Set("positionsComputed", static_cast<double>(s.positions_computed));
    o.Set("promptCached", s.prompt_cached);
    return o;
  }

  Napi::Value live(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(engine_->live()));
  }

  std::shared_ptr<Engine> engine_;
};

// ---- module ---------------------------------------------------------------------------------------

Napi::Value load_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    if (!info[0].IsString()) throw invalid_argument(env, "dir must be a string");
    vdiff::LoadOptions options;
    vdiff::EngineOptions engine_options;
    if (info.Length() > 1 && !info[1].IsUndefined()) {
      if (!info[1].IsObject()) throw invalid_argument(env, "options must be an object");
      const Napi::Object o = info[1].As<Napi::Object>();
      const Napi::Value device = o.Get("device");
      if (!device.IsUndefined()) {
        const std::string d = device.IsString() ? device.As<Napi::String>().Utf8Value() : "";
        if (d == "auto") options.device = vdiff::Device::Auto;
        else if (d == "cpu") options.device = vdiff::Device::Cpu;
        else if (d == "cuda") options.device = vdiff::Device::Cuda;
        else throw invalid_argument(env, "options.device must be \"auto\", \"cpu\" or \"cuda\"");
      }
      const Napi::Value utilization = o.Get("gpuMemoryUtilization");
      if (!utilization.IsUndefined()) {
        const double u = utilization.IsNumber() ? utilization.As<Napi::Number>().DoubleValue() : -1.0;
        if (!(u > 0.0 && u <= 1.0)) throw invalid_argument(env, "options.gpuMemoryUtilization must be in (0, 1]");
        options.gpu_memory_utilization = u;
      }
      const Napi::Value threads = o.Get("threads");
      if (!threads.IsUndefined())
        options.threads = static_cast<int>(integer_of(env, threads, "options.threads", 0, 4096));
      const Napi::Value dtype = o.Get("kvCacheDtype");
      if (!dtype.IsUndefined()) {
        const std::string d = dtype.IsString() ? dtype.As<Napi::String>().Utf8Value() : "";
        if (d == "f32") options.kv_cache_dtype = vdiff::KVCacheDType::F32;
        else if (d == "bf16") options.kv_cache_dtype = vdiff::KVCacheDType::BF16;
        else throw invalid_argument(env, "options.kvCacheDtype must be \"f32\" or \"bf16\"");
      }
      const Napi::Value budget = o.Get("kvCacheBudgetBytes");
      if (!budget.IsUndefined())
        options.kv_cache_budget_bytes =
            static_cast<uint64_t>(integer_of(env, budget, "options.kvCacheBudgetBytes", 0, kMaxSafeInteger));
      const Napi::Value prefixes = o.Get("prefixCacheBytes");
      if (!prefixes.IsUndefined())
        engine_options.prefix_cache_bytes =
            static_cast<uint64_t>(integer_of(env, prefixes, "options.prefixCacheBytes", 0, kMaxSafeInteger));
      const Napi::Value chunk = o.Get("prefillChunk");
      if (!chunk.IsUndefined())
        engine_options.prefill_chunk = static_cast<int>(integer_of(env, chunk, "options.prefillChunk", 0, 1 << 30));
      const Napi::Value pack = o.Get("packWeightsMaxBytes");
      if (!pack.IsUndefined())
        options.pack_weights_max_bytes =
            static_cast<uint64_t>(integer_of(env, pack, "options.packWeightsMaxBytes", 0, kMaxSafeInteger));
      const Napi::Value quantize = o.Get("quantize");
      if (!quantize.IsUndefined()) {
        const std::string q = quantize.IsString() ? quantize.As<Napi::String>().Utf8Value() : "";
        if (q == "none") options.quantize = vdiff::Quant::None;
        else if (q == "q8_0") options.quantize = vdiff::Quant::Q8_0;
        else if (q == "q4_0") options.quantize = vdiff::Quant::Q4_0;
        else throw invalid_argument(env, "options.quantize must be \"none\", \"q8_0\" or \"q4_0\"");
      }
      const Napi::Value isa = o.Get("cpuIsa");
      if (!isa.IsUndefined()) {
        // The name is checked at load (cpu::kernels_for_setting), which also knows what this CPU runs.
        if (!isa.IsString()) throw invalid_argument(env, "options.cpuIsa must be a string");
        options.cpu_isa = isa.As<Napi::String>().Utf8Value();
      }
    }
    Napi::Function on_progress;
    if (info.Length() > 1 && info[1].IsObject()) {
      const Napi::Value callback = info[1].As<Napi::Object>().Get("onProgress");
      if (callback.IsFunction()) on_progress = callback.As<Napi::Function>();
      else if (!callback.IsUndefined()) throw invalid_argument(env, "options.onProgress must be a function");
    }
    auto* worker = new LoadWorker(env, info[0].As<Napi::String>().Utf8Value(), options, engine_options, on_progress);
    Napi::Promise promise = worker->promise();
    worker->Queue();
    return promise;
  } catch (const Napi::Error& e) {
    return rejected(env, e);
  }
}

Napi::Object init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  const Napi::Function engine_class = NativeEngine::define(env);
  const Napi::Function cancel_class = CancelToken::define(env);
  data->engine_constructor = Napi::Persistent(engine_class);
  data->cancel_constructor = Napi::Persistent(cancel_class);
  env.SetInstanceData<AddonData>(data);
  exports.Set("loadModel", Napi::Function::New<load_model>(env, "loadModel"));
  exports.Set("cudaDevices", Napi::Function::New(
                                 env,
                                 [](const Napi::CallbackInfo& info) {
                                   return Napi::Number::New(info.Env(), vdiff::Backend::cuda_devices());
                                 },
                                 "cudaDevices"));
  exports.Set("NativeEngine", engine_class);
  exports.Set("CancelToken", cancel_class);
  return exports;
}

}  // namespace

NODE_API_MODULE(vdiff, init)
