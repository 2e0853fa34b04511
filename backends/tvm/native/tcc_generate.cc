// tcc-generate: greedy or sampled generation with a causal-LM tcc bundle, token ids in and out.
//
//   tcc-generate [--bundle DIR] --ids 1,2,3 [--max-new-tokens N] [--temperature T] [--top-k K]
//                [--top-p P] [--seed S] [--no-stop] [--timing]
// Prints the new token ids on one line, comma separated. The application tokenizes: the bundle holds
// no tokenizer runtime (its tokenizer/ folder, where the artifact has one, is for the application).
// Stops at an end-of-sequence id (unless --no-stop), after N tokens, or when the context is full.
// --timing adds a line on stderr: prefill and decode tokens per second.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "tcc.h"
#include "tcc_tool.h"

int main(int argc, char** argv) {
  const char* usage = "[--bundle DIR] --ids 1,2,3 [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] "
                      "[--seed S] [--no-stop] [--timing]";
  std::string bundle = tcc_tool::DefaultBundle(argv[0]), ids_arg;
  long long max_new = 32, seed = 0, top_k = 0;
  double temperature = 0, top_p = 1;
  bool stop = true, timing = false;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      const bool more = i + 1 < argc;
      if (a == "--bundle" && more) bundle = argv[++i];
      else if (a == "--ids" && more) ids_arg = argv[++i];
      else if (a == "--max-new-tokens" && more) max_new = std::stoll(argv[++i]);
      else if (a == "--temperature" && more) temperature = std::stod(argv[++i]);
      else if (a == "--top-k" && more) top_k = std::stoll(argv[++i]);
      else if (a == "--top-p" && more) top_p = std::stod(argv[++i]);
      else if (a == "--seed" && more) seed = std::stoll(argv[++i]);
      else if (a == "--no-stop") stop = false;
      else if (a == "--timing") timing = true;
      else if (a == "-h" || a == "--help") return std::printf("usage: %s %s\n", argv[0], usage), 0;
      else return tcc_tool::Usage(argv[0], "unexpected argument " + a, usage);
    }
  } catch (const std::exception&) {
    return tcc_tool::Usage(argv[0], "a number was expected", usage);
  }
  std::vector<int64_t> prompt;
  std::istringstream ss(ids_arg);
  std::string item;
  try {
    while (std::getline(ss, item, ','))
      if (item.find_first_not_of(' ') != std::string::npos) prompt.push_back(std::stoll(item));
  } catch (const std::exception&) {
    return tcc_tool::Usage(argv[0], "--ids takes comma-separated integers, got '" + ids_arg + "'", usage);
  }
  if (prompt.empty()) return tcc_tool::Usage(argv[0], "no prompt: give --ids", usage);
  if (max_new < 0) return tcc_tool::Usage(argv[0], "--max-new-tokens must be >= 0", usage);

  tcc_sampler sampler;
  if (tcc_status s = tcc_sampler_init(&sampler, static_cast<float>(temperature), static_cast<int32_t>(top_k),
                                      static_cast<float>(top_p), static_cast<uint64_t>(seed)))
    return tcc_tool::Report(s);
  tcc_model* model = nullptr;
  if (tcc_status s = tcc_open(bundle.c_str(), &model)) return tcc_tool::Report(s);
  std::vector<float> logits(tcc_vocab_size(model));
  std::vector<int64_t> eos;
  for (int i = 0; i < tcc_num_eos(model); ++i) eos.push_back(tcc_eos(model, i));
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  tcc_status s = tcc_prefill(model, prompt.data(), static_cast<int64_t>(prompt.size()), logits.data());
  const double prefill_s = std::chrono::duration<double>(clock::now() - t0).count();
  double decode_s = 0;
  long long decoded = 0;
  const long long budget = std::min<long long>(max_new, tcc_max_context(model) - static_cast<long long>(prompt.size()));
  std::string out;
  for (long long i = 0; s == TCC_OK && i < budget; ++i) {
    int64_t token = 0;
    if ((s = tcc_sample(&sampler, logits.data(), static_cast<int64_t>(logits.size()), &token))) break;
    out += (out.empty() ? "" : ",") + std::to_string(token);
    bool is_eos = false;
    for (int64_t e : eos) is_eos |= e == token;
    if ((stop && is_eos) || i == budget - 1) break;
    auto t1 = clock::now();
    s = tcc_decode(model, token, logits.data());
    decode_s += std::chrono::duration<double>(clock::now() - t1).count();
    ++decoded;
  }
  int rc = 0;
  if (s) {
    rc = tcc_tool::Report(s);
  } else {
    std::printf("%s\n", out.c_str());
    if (timing)
      std::fprintf(stderr, "prefill %zu tokens %.2f tok/s, decode %lld tokens %.2f tok/s\n", prompt.size(),
                   prompt.size() / prefill_s, decoded, decoded ? decoded / decode_s : 0.0);
  }
  tcc_close(model);
  return rc;
}
