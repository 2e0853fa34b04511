/* run_model: a C program linked against a tcc bundle's C API (include/tcc.h, lib/libtcc.so).
 *
 *   cc run_model.c $(pkg-config --cflags --libs tcc) -o run_model    (PKG_CONFIG_PATH=BUNDLE/lib/pkgconfig)
 *   ./run_model BUNDLE                 run once on fixed inputs, print each output's sum and first values
 *   ./run_model BUNDLE IDS N           causal LMs: N greedy tokens after the comma-separated ids
 *
 * The fixed inputs: integer inputs named *mask* are 1, other integers (i * 7 + 3) % 50, floats
 * sin(i), for element i of each input. Exit status: 0, or the tcc_status of the first failing call.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tcc.h"

static int fail(const char* what, tcc_status s) {
  fprintf(stderr, "%s failed (status %d): %s\n", what, (int)s, tcc_last_error());
  return (int)s;
}

static size_t elements(const tcc_tensor* t) {
  size_t n = 1;
  for (int d = 0; d < t->ndim; ++d) n *= (size_t)t->shape[d];
  return n;
}

static int run_once(tcc_model* model) {
  int n_in = tcc_num_inputs(model), n_out = tcc_num_outputs(model);
  tcc_tensor* in = calloc((size_t)n_in, sizeof(tcc_tensor));
  tcc_tensor* out = calloc((size_t)n_out, sizeof(tcc_tensor));
  for (int k = 0; k < n_in; ++k) {
    tcc_input_info(model, k, &in[k]);
    in[k].data = malloc(in[k].nbytes);
    for (size_t i = 0; i < elements(&in[k]); ++i) {
      if (strcmp(in[k].dtype, "int64") == 0)
        ((long long*)in[k].data)[i] = strstr(in[k].name, "mask") ? 1 : (long long)((i * 7 + 3) % 50);
      else if (strcmp(in[k].dtype, "float32") == 0)
        ((float*)in[k].data)[i] = (float)sin((double)i);
      else
        memset(in[k].data, 0, in[k].nbytes);
    }
  }
  for (int k = 0; k < n_out; ++k) {
    tcc_output_info(model, k, &out[k]);
    out[k].data = malloc(out[k].nbytes);
  }
  tcc_status s = tcc_run(model, in, n_in, out, n_out);
  if (s != TCC_OK) return fail("tcc_run", s);
  for (int k = 0; k < n_out; ++k) {
    if (strcmp(out[k].dtype, "float32") != 0) continue;
    const float* v = out[k].data;
    double sum = 0;
    for (size_t i = 0; i < elements(&out[k]); ++i) sum += v[i];
    printf("%s sum %.9g first %.9g %.9g %.9g %.9g\n", out[k].name, sum, v[0], v[1], v[2], v[3]);
  }
  for (int k = 0; k < n_in; ++k) free(in[k].data);
  for (int k = 0; k < n_out; ++k) free(out[k].data);
  free(in);
  free(out);
  return 0;
}

static int generate(tcc_model* model, const char* ids_text, int n) {
  if (!tcc_is_causal_lm(model)) {
    fprintf(stderr, "the bundle is not a causal LM\n");
    return 1;
  }
  long long vocab = tcc_vocab_size(model);
  int64_t prompt[256];
  int64_t count = 0;
  char* copy = strdup(ids_text);
  for (char* tok = strtok(copy, ","); tok && count < 256; tok = strtok(NULL, ",")) prompt[count++] = atoll(tok);
  free(copy);
  float* logits = malloc(sizeof(float) * (size_t)vocab);
  tcc_sampler greedy;
  tcc_sampler_init(&greedy, 0.0f, 0, 1.0f, 0);
  tcc_status s = tcc_prefill(model, prompt, count, logits);
  if (s != TCC_OK) return fail("tcc_prefill", s);
  for (int i = 0; i < n; ++i) {
    int64_t token;
    tcc_sample(&greedy, logits, vocab, &token);
    printf("%s%lld", i ? "," : "", (long long)token);
    if (i + 1 < n && (s = tcc_decode(model, token, logits)) != TCC_OK) return fail("tcc_decode", s);
  }
  printf("\n");
  /* bad input is an error code and a message, not an abort */
  s = tcc_decode(model, vocab, logits);
  printf("decode(%lld): status %d: %s\n", vocab, (int)s, tcc_last_error());
  free(logits);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 2 && argc != 4) {
    fprintf(stderr, "usage: %s BUNDLE [IDS N]\n", argv[0]);
    return 2;
  }
  tcc_model* model = NULL;
  tcc_status s = tcc_open(argv[1], &model);
  if (s != TCC_OK) return fail("tcc_open", s);
  int rc = argc == 2 ? run_once(model) : generate(model, argv[2], atoi(argv[3]));
  tcc_close(model);
  return rc;
}
