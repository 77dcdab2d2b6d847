"""
Streaming overhead: tokens/s of chat.py's answer (decode each token, print it as it comes) against the
bare generation engine (GPT.generate_stream) on the same model, prompt and number of new tokens, at
batch 1, greedy. The target: the chat streams no slower than the engine within noise (a few percent).

    python bench/chat.py                                  # the cpu pipeline's domain model (after run.py)
    python bench/chat.py --model out_gpu/pretrain_domain --tokenizer out_gpu/tokenizer.json
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import chat  # noqa: E402
from data import END, EOT, load_tokenizer  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="out/pretrain_domain", help="a pretrained model: it never stops early")
    parser.add_argument("--tokenizer", default="out/tokenizer.json", help="the tokenizer of its run")
    parser.add_argument("--new_tokens", type=int, default=96, help="tokens per answer")
    parser.add_argument("--repeats", type=int, default=7, help="answers timed per way (the median is printed)")
    args = parser.parse_args()
    for path in (chat.find_checkpoint(args.model), args.tokenizer):
        if not os.path.exists(path):
            sys.exit(f"bench/chat.py: not found: {path} (run `python run.py` first, or pass --model and --tokenizer)")
    enc = load_tokenizer(args.tokenizer)
    with contextlib.redirect_stderr(io.StringIO()):
        (model,) = chat.load_models([args.model], enc, "cpu")
    if model.stage != "pretrain":
        sys.exit(f"bench/chat.py: {args.model} is a {model.stage} model; a pretrained one writes every token asked for")
    ctx = SimpleNamespace(enc=enc, eot=enc.encode_single_token(EOT), end=enc.encode_single_token(END), scorers=None,
                          models=[model], best_of=0)
    settings = dict(temperature=0.0, top_k=0, top_p=1.0, max_tokens=args.new_tokens)
    request = 'def mean(values):\n    """Return the arithmetic mean of'
    prompt = enc.encode_ordinary(request)

    def engine():
        """The bare engine, called and timed as chat.py calls and times it: from the first token to the last."""
        n = 0
        for _ in model.gpt.generate_stream([prompt], args.new_tokens, 0.0, None, 1.0, ctx.eot, ctx.eot):
            n += 1
            first = time.perf_counter() if n == 1 else first
        return (n - 1) / (time.perf_counter() - first)

    def streamed():
        with contextlib.redirect_stdout(io.StringIO()):  # printed, as to a terminal, into memory
            r = chat.answer(ctx, model, request, [], None, settings, None, chat.printer(ctx, False))
        return r["tok_per_s"]

    engine(), streamed()  # warm-up
    rates = {"engine (generate_stream)": [], "chat.py answer, streamed": []}
    for _ in range(args.repeats):  # interleaved, so that a busy moment hits both
        rates["engine (generate_stream)"].append(engine())
        rates["chat.py answer, streamed"].append(streamed())
    for name, r in rates.items():
        print(f"{name:>26}: {statistics.median(r):7,.0f} tokens/s "
              f"(median of {args.repeats}; {min(r):,.0f}-{max(r):,.0f})")
    ratio = statistics.median(rates["chat.py answer, streamed"]) / statistics.median(rates["engine (generate_stream)"])
    print(f"{model.name}, {args.new_tokens} new tokens, batch 1, greedy, cpu: the chat streams at {ratio:.1%} "
          f"of the engine's rate")
