// tcc-generate: greedy or sampled generation with a causal-LM tcc bundle, token ids in and out.
//
//   tcc-generate [--bundle DIR] --ids 1,2,3 [--max-new-tokens N] [--temperature T] [--top-k K]
//                [--top-p P] [--seed S] [--no-stop] [--timing] [--speculate lookup]
// Prints the new token ids on one line, comma separated. The application tokenizes: the bundle holds
// no tokenizer runtime (its tokenizer/ folder, where the artifact has one, is for the application).
// Stops at an end-of-sequence id (unless --no-stop), after N tokens, or when the context is full.
// --timing adds a line on stderr: prefill and decode tokens per second.
// --speculate lookup (greedy): prompt lookup as tcc.speculative.LookupDraft proposes, each round's
// proposals checked in one tcc_verify call and the rejected ones rewound: the ids of plain greedy decoding
// (where the verify rows are the decode steps', generation.verify_vs_decode 0), fewer model calls.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "tcc.h"
#include "tcc_tool.h"

namespace {

// tcc.speculative.LookupDraft: the context's last n tokens (n = 3 down to 1) found earlier in it (the latest
// occurrence) propose what followed them: at most k tokens, at most `weak` after a match shorter than 3.
std::vector<int64_t> Lookup(const std::vector<int64_t>& ctx, size_t k, size_t weak) {
  const size_t n_ctx = ctx.size(), ngram = 3;
  for (size_t n = std::min(ngram, n_ctx - 1); n >= 1; --n) {
    for (size_t start = n_ctx - n; start-- > 0;) {
      if (!std::equal(ctx.begin() + start, ctx.begin() + start + n, ctx.end() - n)) continue;
      const size_t take = std::min(n >= ngram || !weak ? k : std::min(k, weak), n_ctx - start - n);
      if (take) return {ctx.begin() + start + n, ctx.begin() + start + n + take};
    }
  }
  return {};
}

size_t Argmax(const float* row, int64_t n) { return std::max_element(row, row + n) - row; }

}  // namespace

int main(int argc, char** argv) {
  const char* usage = "[--bundle DIR] --ids 1,2,3 [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] "
                      "[--seed S] [--no-stop] [--timing] [--speculate lookup]";
  std::string bundle = tcc_tool::DefaultBundle(argv[0]), ids_arg;
  long long max_new = 32, seed = 0, top_k = 0;
  double temperature = 0, top_p = 1;
  bool stop = true, timing = false, speculate = false;
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
      else if (a == "--speculate" && more) {
        if (std::string(argv[++i]) != "lookup")
          return tcc_tool::Usage(argv[0], std::string("--speculate takes lookup (prompt lookup), got ") + argv[i], usage);
        speculate = true;
      }
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
  if (speculate && temperature > 0)
    return tcc_tool::Usage(argv[0], "--speculate lookup decodes greedily here: leave --temperature out", usage);

  tcc_sampler sampler;
  if (tcc_status s = tcc_sampler_init(&sampler, static_cast<float>(temperature), static_cast<int32_t>(top_k),
                                      static_cast<float>(top_p), static_cast<uint64_t>(seed)))
    return tcc_tool::Report(s);
  tcc_model* model = nullptr;
  if (tcc_status s = tcc_open(bundle.c_str(), &model)) return tcc_tool::Report(s);
  const int64_t vocab = tcc_vocab_size(model), verify_len = speculate ? tcc_verify_len(model) : 0;
  if (speculate && verify_len < 2) {
    std::fprintf(stderr, "error: %s has no verify entry for --speculate lookup (compile and bundle the model again "
                         "with this tcc, or leave --speculate out)\n", bundle.c_str());
    tcc_close(model);
    return 2;
  }
  std::vector<float> logits(vocab), rows;
  std::vector<int64_t> eos;
  for (int i = 0; i < tcc_num_eos(model); ++i) eos.push_back(tcc_eos(model, i));
  auto is_eos = [&](int64_t t) { return std::find(eos.begin(), eos.end(), t) != eos.end(); };
  using clock = std::chrono::steady_clock;
  auto t0 = clock::now();
  tcc_status s = tcc_prefill(model, prompt.data(), static_cast<int64_t>(prompt.size()), logits.data());
  const double prefill_s = std::chrono::duration<double>(clock::now() - t0).count();
  double decode_s = 0;
  long long decoded = 0, calls = 0, verifies = 0, proposed = 0, accepted = 0;
  const long long context = tcc_max_context(model);
  const long long budget = std::min<long long>(max_new, context - static_cast<long long>(prompt.size()));
  std::string out;
  std::vector<int64_t> ctx(prompt);
  // after a weak (shorter than 3-gram) match, what the 4-row verify entry holds (tcc.speculative.short_proposal;
  // tcc.generation.VERIFY_SHORT), where there is a longer one
  const size_t weak = verify_len > 4 ? 3 : 0;
  int64_t token = 0;
  if (s == TCC_OK && budget > 0) s = tcc_sample(&sampler, logits.data(), vocab, &token);
  for (long long n = 0; s == TCC_OK && n < budget;) {
    ctx.push_back(token);
    out += (out.empty() ? "" : ",") + std::to_string(token);
    if ((stop && is_eos(token)) || ++n == budget) break;
    auto t1 = clock::now();
    const long long p = static_cast<long long>(ctx.size()) - 1;  // token goes in at position p
    const long long width = p + verify_len <= context ? std::min<long long>(verify_len - 1, budget - n - 1) : 0;
    std::vector<int64_t> drafts = width > 0 ? Lookup(ctx, width, weak) : std::vector<int64_t>{};
    ++calls;
    bool ended = false;  // an accepted draft ended the generation
    if (drafts.empty()) {
      s = tcc_decode(model, token, logits.data());
      if (s == TCC_OK) s = tcc_sample(&sampler, logits.data(), vocab, &token);
      ++decoded;
    } else {
      std::vector<int64_t> chunk{token};
      chunk.insert(chunk.end(), drafts.begin(), drafts.end());
      rows.resize(chunk.size() * vocab);
      if ((s = tcc_verify(model, chunk.data(), static_cast<int64_t>(chunk.size()), rows.data()))) break;
      size_t j = 0;
      while (j < drafts.size() && static_cast<int64_t>(Argmax(rows.data() + j * vocab, vocab)) == drafts[j]) ++j;
      ++verifies, proposed += drafts.size(), accepted += j;
      if ((s = tcc_rewind(model, p + j + 1))) break;
      for (size_t i = 0; i < j && !ended; ++i) {  // the accepted drafts; the row after them gives the next token
        ctx.push_back(drafts[i]);
        out += "," + std::to_string(drafts[i]);
        ended = (stop && is_eos(drafts[i])) || ++n == budget;
      }
      decoded += j + 1;
      token = static_cast<int64_t>(Argmax(rows.data() + j * vocab, vocab));
    }
    decode_s += std::chrono::duration<double>(clock::now() - t1).count();
    if (ended) break;
  }
  int rc = 0;
  if (s) {
    rc = tcc_tool::Report(s);
  } else {
    std::printf("%s\n", out.c_str());
    if (timing)
      std::fprintf(stderr, "prefill %zu tokens %.2f tok/s, decode %lld tokens %.2f tok/s\n", prompt.size(),
                   prompt.size() / prefill_s, decoded, decoded ? decoded / decode_s : 0.0);
    if (timing && speculate)
      std::fprintf(stderr, "speculate lookup: %lld model calls (%lld verify), %lld of %lld proposed tokens accepted\n",
                   calls, verifies, accepted, proposed);
  }
  tcc_close(model);
  return rc;
}
