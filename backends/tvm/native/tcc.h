/* tcc.h: the C API of a tcc bundle (`tcc export ARTIFACT --bundle DIR`).
 *
 * A bundle holds a compiled model (lib/model.so), its weights (weights.safetensors), its manifest
 * and the runtime it needs (lib/libtcc.so, the TVM runtime and FFI libraries, OpenBLAS). Link with
 * `pkg-config --cflags --libs tcc` (PKG_CONFIG_PATH=DIR/lib/pkgconfig) or -IDIR/include -LDIR/lib -ltcc.
 *
 * Every function that can fail returns a tcc_status; TCC_OK is 0. On failure tcc_last_error() gives
 * a one-line message (per thread, valid until the next call on that thread). Bad input (an unknown
 * name, a wrong dtype or shape, an out-of-range token id, a corrupt weights file) is an error code,
 * never an abort. A tcc_model is not thread-safe: one call at a time per model.
 */
#ifndef TCC_H_
#define TCC_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TCC_API_VERSION 1

typedef enum {
  TCC_OK = 0,
  TCC_ERROR_IO = 1,               /* a bundle file is missing or unreadable */
  TCC_ERROR_CORRUPT = 2,          /* a file does not match its sha256 in the manifest, or is malformed */
  TCC_ERROR_INVALID_ARGUMENT = 3, /* unknown name, wrong dtype/shape/size, token id or position out of range, NULL */
  TCC_ERROR_UNSUPPORTED = 4,      /* e.g. prefill/decode on a model compiled without generation */
  TCC_ERROR_RUNTIME = 5           /* the model library failed while running */
} tcc_status;

typedef struct tcc_model tcc_model;

/* A tensor: row-major, contiguous. dtype is a numpy name: "float32", "int64", "int32", "int8",
 * "uint8", "bool", "float16", "bfloat16". */
typedef struct {
  const char* name;
  const char* dtype;
  int32_t ndim;
  const int64_t* shape;
  void* data;
  size_t nbytes;
} tcc_tensor;

/* The message of the last failed call on this thread ("" if none). */
const char* tcc_last_error(void);
/* TCC_API_VERSION of the library. */
int32_t tcc_api_version(void);

/* Load the bundle in `bundle_dir` (the directory that holds manifest.json): checks the sha256 of
 * lib/model.so and weights.safetensors against the manifest, loads the library and the weights. */
tcc_status tcc_open(const char* bundle_dir, tcc_model** model);
void tcc_close(tcc_model* model);

/* The model's inputs and outputs (names, dtypes, shapes, nbytes; data is NULL). The pointers stay
 * valid until tcc_close. */
int32_t tcc_num_inputs(const tcc_model* model);
int32_t tcc_num_outputs(const tcc_model* model);
tcc_status tcc_input_info(const tcc_model* model, int32_t index, tcc_tensor* info);
tcc_status tcc_output_info(const tcc_model* model, int32_t index, tcc_tensor* info);

/* Run the model ("main") once. Every input is given once, by name, with the dtype and shape the model
 * takes (or ndim 0 and shape NULL to skip the shape check) and exactly nbytes bytes. Outputs are
 * matched by name; each output's data must hold at least its nbytes (set nbytes to the buffer size).
 * Integer inputs with a valid range in the manifest (token ids: the vocabulary) are checked against it. */
tcc_status tcc_run(tcc_model* model, const tcc_tensor* inputs, int32_t n_inputs, tcc_tensor* outputs,
                   int32_t n_outputs);

/* -- causal LMs (bundles of artifacts compiled with generation: prefill/decode over a KV cache) ----- */
int32_t tcc_is_causal_lm(const tcc_model* model);
int64_t tcc_vocab_size(const tcc_model* model);   /* 0 when not a causal LM */
int64_t tcc_max_context(const tcc_model* model);  /* positions the KV cache holds */
int64_t tcc_position(const tcc_model* model);     /* tokens in the cache now */
/* The end-of-sequence ids from the model's generation config (may be none). */
int32_t tcc_num_eos(const tcc_model* model);
int64_t tcc_eos(const tcc_model* model, int32_t index);
/* Empty the KV cache (a new sequence). */
tcc_status tcc_reset(tcc_model* model);
/* Append n tokens (n >= 1) to the sequence; logits (may be NULL) receives the vocab_size logits of the
 * last one. The first prefill after a reset matches `tcc generate` exactly (same chunks). */
tcc_status tcc_prefill(tcc_model* model, const int64_t* ids, int64_t n, float* logits);
/* Append one token; logits (may be NULL) receives the vocab_size logits after it. */
tcc_status tcc_decode(tcc_model* model, int64_t token, float* logits);

/* -- speculative decoding: check several proposed tokens in one call, then keep the accepted ones -- */
/* The most tokens one tcc_verify takes (0: the bundle has no verify entry). */
int64_t tcc_verify_len(const tcc_model* model);
/* Append n tokens (1 <= n <= tcc_verify_len) through the shortest verify entry that holds them;
 * logits (may be NULL) receives n x vocab_size logits, row i the distribution of the token after ids[i]
 * (the row a decode step of ids[i] gives, bit for bit, where the manifest's generation.verify_vs_decode
 * is 0). Needs a prefilled sequence, and n verify positions left in the context. */
tcc_status tcc_verify(tcc_model* model, const int64_t* ids, int64_t n, float* logits);
/* Keep the first `length` tokens of the sequence (0 <= length <= tcc_position): drops rejected
 * proposals; the next call writes over their cache rows. */
tcc_status tcc_rewind(tcc_model* model, int64_t length);

/* Choosing the next token: greedy when temperature <= 0 (the first largest logit), else a draw from
 * softmax(logits / temperature) cut to the top_k tokens (0: all) and the smallest set whose
 * probability reaches top_p (1: all). The seeded generator (xoshiro256**) is not numpy's: sampled
 * ids differ from `tcc generate --seed`, greedy ids are the same. */
typedef struct {
  float temperature;
  int32_t top_k;
  float top_p;
  uint64_t state[4];
} tcc_sampler;

tcc_status tcc_sampler_init(tcc_sampler* sampler, float temperature, int32_t top_k, float top_p, uint64_t seed);
tcc_status tcc_sample(tcc_sampler* sampler, const float* logits, int64_t vocab_size, int64_t* token);

#ifdef __cplusplus
}
#endif
#endif /* TCC_H_ */
