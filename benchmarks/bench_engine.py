"""Serving engine speed: one chat against bare ``model.generate``, then 1, 4 and 16 chats at once.

Figures, all greedy on the same model and prompt:

* time to first token (TTFT): bare = ``generate(max_new_tokens=1)``; engine = from the
  ``stream()`` call to the first sampled token (prompt building, queueing and prefill).
* decode tokens/s: bare = ``(N - 1) / (t(generate N) - t(generate 1))``; engine =
  ``(completion_tokens - 1) / (finish - first token)``. Both as medians over ``--repeats``.
* aggregate tokens/s with C chats started together = all completion tokens / wall time from
  the first ``stream()`` to the last reply's end; then the most chats again, all on a random
  rank-16 LoRA adapter, and split between the base and that adapter (one mixed batch: the
  price of a hot-swap's overlap, when old and new versions run side by side).

Default model: a random-weight Llama (~30M parameters, 8 layers of width 512) with a
tokenizer trained here on the standard library's docstrings; its end token's output row is
zeroed so every reply runs its full length. Speed does not depend on the weights' values.
``--layers 28 --hidden 1536 --vocab 151936`` gives one shaped like a 1.5B chat model (1.26B
parameters, full multi-head attention) without downloading any weights.

    python benchmarks/bench_engine.py [--model PATH_OR_ID] [--device cpu|cuda] [--4bit]
                                      [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import build_random_llama  # noqa: E402

from chat_app.engine import BASE_VERSION, Engine, EngineConfig, SamplingParams  # noqa: E402
from chat_app.engine.loading import load_model  # noqa: E402


def make_chat(tokenizer, prompt_tokens: int, variant: int = 0) -> list[dict]:
    """A system + user chat whose prompt is about ``prompt_tokens`` tokens long."""
    filler = (
        f"Chat {variant}. The service stores every reply with the adapter version that wrote "
        "it, and people rate replies with thumbs, edits and choices. "
    )
    source = filler.split()
    words: list[str] = []
    while True:
        chat = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": " ".join(words)},
        ]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= prompt_tokens:
            return chat
        words.append(source[len(words) % len(source)])


class BareGenerate:
    """Plain ``model.generate`` on a second copy loaded by the engine's own loader."""

    def __init__(self, config: EngineConfig, chat: list[dict]) -> None:
        loaded = load_model(config)
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.inputs = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        self.prompt_tokens = int(self.inputs["input_ids"].shape[1])

    def timed(self, n: int) -> tuple[float, int]:
        """Seconds for ``generate(max_new_tokens=n)`` and the tokens it produced."""
        self._sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **self.inputs, do_sample=False, max_new_tokens=n,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        self._sync()
        return time.perf_counter() - start, out.shape[1] - self.prompt_tokens

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def bench_single(
    engine: Engine, bare: BareGenerate, chat: list[dict], new_tokens: int, repeats: int
) -> dict:
    """TTFT and decode rate of one chat, engine and bare runs interleaved; medians."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    engine.stream(chat, SamplingParams(temperature=0.0, max_new_tokens=4)).result()  # warm-up
    bare.timed(4)
    runs: dict[str, list[float]] = {k: [] for k in ("e_ttft", "e_rate", "b_ttft", "b_rate")}
    for _ in range(repeats):
        gen = engine.stream(chat, params)
        gen.result()
        runs["e_ttft"].append(gen.time_to_first_token)
        runs["e_rate"].append((gen.completion_tokens - 1) / max(gen.decode_seconds, 1e-9))
        t1, _ = bare.timed(1)
        tn, produced = bare.timed(new_tokens)
        runs["b_ttft"].append(t1)
        runs["b_rate"].append((produced - 1) / max(tn - t1, 1e-9))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "bare_generate": {"ttft_s": med["b_ttft"], "decode_tok_s": med["b_rate"]},
        "engine": {"ttft_s": med["e_ttft"], "decode_tok_s": med["e_rate"]},
        "engine_over_bare_decode": med["e_rate"] / med["b_rate"],
        "engine_over_bare_ttft": med["e_ttft"] / med["b_ttft"],
    }


def save_random_adapter(model: torch.nn.Module, path: Path) -> Path:
    """Wrap ``model`` with a rank-16 LoRA on every linear layer, randomise it, save it."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.01)
    peft_model.save_pretrained(path)
    return path


def bench_concurrent(
    engine: Engine,
    chats: list[list[dict]],
    new_tokens: int,
    versions: tuple[str, ...] = (BASE_VERSION,),
) -> dict:
    """Start ``len(chats)`` replies together (versions taken in turn), each read by its own
    thread; time them all."""
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    gens = []
    done: list[float] = []

    def read(gen) -> None:
        for _ in gen:
            pass
        done.append(time.perf_counter())

    start = time.perf_counter()
    threads = []
    for i, chat in enumerate(chats):
        gen = engine.stream(chat, params, version=versions[i % len(versions)])
        gens.append(gen)
        threads.append(threading.Thread(target=read, args=(gen,)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = max(done) - start
    tokens = sum(g.completion_tokens for g in gens)
    return {
        "chats": len(chats),
        "versions": "+".join(versions),
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "mean_ttft_s": statistics.mean(g.time_to_first_token for g in gens),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="hub id or path (default: a random ~30M Llama)")
    parser.add_argument("--layers", type=int, default=8, help="layers of the random Llama")
    parser.add_argument("--hidden", type=int, default=512, help="width of the random Llama")
    parser.add_argument("--vocab", type=int, default=4096,
                        help="vocabulary of the random Llama (its output layer's size); "
                        "28 x 1536 with 151936 is shaped like a 1.5B model (1.26B here)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--4bit", dest="four_bit", action="store_true", help="NF4 (CUDA only)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    most = max(args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_random_llama(
            Path(tmp) / "random-llama", hidden_size=args.hidden, num_layers=args.layers,
            vocab_size=args.vocab, never_end=True))
        config = EngineConfig(
            model=model,
            device=args.device,
            quantize_4bit=args.four_bit,
            max_concurrent=most,
            max_queued=most,
            max_input_tokens=max(2048, args.prompt_tokens),
            torch_threads=args.threads,
        )
        if args.threads:
            torch.set_num_threads(args.threads)
        engine = Engine.from_config(config)
        try:
            chat = make_chat(engine.tokenizer, args.prompt_tokens)
            bare = BareGenerate(config, chat)
            single = bench_single(engine, bare, chat, args.new_tokens, args.repeats)
            parameters = bare.parameters
            adapter = save_random_adapter(bare.model, Path(tmp) / "adapter")
            del bare
            gc.collect()
            chats = [make_chat(engine.tokenizer, args.prompt_tokens, i) for i in range(most)]
            concurrent = [
                bench_concurrent(engine, chats[:c], args.new_tokens) for c in args.concurrency
            ]
            engine.load_adapter("lora", adapter)
            for versions in (("lora",), (BASE_VERSION, "lora")):
                concurrent.append(bench_concurrent(engine, chats, args.new_tokens, versions))
            device, quantized = engine.device, engine.quantized
            prompt_tokens = engine.count_tokens(chat)
        finally:
            engine.close()

    results = {
        "model": args.model or f"random-llama-{args.layers}x{args.hidden}-v{args.vocab}",
        "parameters": parameters,
        "device": device,
        "quantized_4bit": quantized,
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": args.new_tokens,
        "single": single,
        "concurrent": concurrent,
    }
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


def print_table(r: dict) -> None:
    s = r["single"]
    print(
        f"\nmodel {r['model']} ({r['parameters'] / 1e6:.1f}M params) on {r['device']}"
        f"{' 4-bit NF4' if r['quantized_4bit'] else ''}, {r['torch_threads']} torch threads, "
        f"prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens, greedy\n"
    )
    print(f"{'one chat':<24}{'TTFT ms':>10}{'decode tok/s':>14}")
    for name, row in (("bare model.generate", s["bare_generate"]), ("engine.stream", s["engine"])):
        print(f"{name:<24}{row['ttft_s'] * 1e3:>10.1f}{row['decode_tok_s']:>14.1f}")
    print(
        f"{'engine / bare':<24}{s['engine_over_bare_ttft']:>10.2f}"
        f"{s['engine_over_bare_decode']:>14.2f}\n"
    )
    base = r["concurrent"][0]["aggregate_tok_s"]
    print(f"{'chats at once':<14}{'versions':<12}{'tokens':>8}{'wall s':>9}{'agg tok/s':>11}"
          f"{'x first row':>13}{'mean TTFT ms':>14}")
    for row in r["concurrent"]:
        print(
            f"{row['chats']:<14}{row['versions']:<12}{row['tokens']:>8}{row['wall_s']:>9.2f}"
            f"{row['aggregate_tok_s']:>11.1f}{row['aggregate_tok_s'] / base:>13.2f}"
            f"{row['mean_ttft_s'] * 1e3:>14.1f}"
        )


if __name__ == "__main__":
    main()
