#!/usr/bin/env python
"""The LLaMA recipe end to end on one machine, in minutes, on text already on it.

    python examples/demo.py [--out DIR] [--quick]

1. assemble a raw corpus shaped like three of LLaMA's sources from what Python installs: package
   and standard-library sources as BigQuery GitHub rows, the language reference (pydoc_data) as
   C4 rows, docstrings and gettext translations as CommonCrawl WET pages;
2. clean each source (tools/clean_corpus.py; CommonCrawl with CCNet's n-gram perplexity filter, a
   5-gram model of the language reference from tools/train_ngram_lm.py), 3. train a SentencePiece tokenizer
   (tools/train_tokenizer.py), 4. tokenize each source to .bin/.idx (tools/preprocess_data.py),
5. pretrain a small LLaMA with TP=2 x PP=2 on 4 CPU processes (torchrun -m megallama.pretrain,
   the sources blended with the paper's weights), 6. export it to Hugging Face format
   (tools/convert_checkpoint.py), 7. generate continuations (tools/generate.py), 8. turn the
   language reference into questions and answers and tokenize them with an answer-only loss mask
   (tools/preprocess_instructions.py), 9. finetune on them with TP=2 x PP=2 (--finetune, packed
   examples) and chat with the model before and after (tools/generate.py --chat).

Every stage runs the same command a user would run (printed before it runs). Outputs go under
--out; a summary is printed at the end and written to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing

from megallama.clean.io import write_json  # noqa: E402
from megallama.fileio import atomic_open  # noqa: E402
from megallama.data.indexed import IndexedDataset  # noqa: E402
from demo_corpus import CorpusSizes, assemble_corpus, reference_instructions, write_jsonl  # noqa: E402  (next to this file)

MARKER = ".megallama-demo"  # an --out folder holding it may be wiped by a new run
SOURCES = ("commoncrawl", "c4", "github")
# LLaMA's sampling proportions (Touvron et al. 2023, Table 1) for the three sources the demo has.
WEIGHTS = {"commoncrawl": 67.0, "c4": 15.0, "github": 4.5}
PROMPTS = ("def __init__(self", "The import statement", "Return the number of")
SAMPLING = ("--temperature", "0.8", "--top-k", "40", "--seed", "1234")  # fixed seed: the same text each run
STAGES = 9
# Asked before and after finetuning; the answer is in the instruction set (the language reference).
CHAT_PROMPT = 'Explain the "assert" statement in Python.'


@dataclass
class Settings:
    """What --quick changes."""

    corpus: CorpusSizes
    vocab_size: int
    num_layers: int
    hidden_size: int
    heads: int
    seq_length: int
    micro_batch: int
    global_batch: int
    train_iters: int
    lr: float
    log_interval: int
    max_new_tokens: int
    perplexity_buckets: str = "head,middle"  # CommonCrawl pages kept by the n-gram filter (RedPajama's)
    finetune_iters: int = 60  # LLaMA-I: a short instruction finetune of the pretrained checkpoint

    @classmethod
    def full(cls) -> "Settings":
        return cls(CorpusSizes.full(), vocab_size=4000, num_layers=4, hidden_size=128, heads=4,
                   seq_length=128, micro_batch=4, global_batch=16, train_iters=400, lr=3e-3,
                   log_interval=10, max_new_tokens=40)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(CorpusSizes.quick(), vocab_size=1000, num_layers=4, hidden_size=64, heads=4,
                   seq_length=64, micro_batch=2, global_batch=8, train_iters=30, lr=3e-3,
                   log_interval=5, max_new_tokens=16,
                   # toy size: a handful of English pages; dropping the tail would leave too few to
                   # split off validation data, so the buckets are only labelled and reported
                   perplexity_buckets="head,middle,tail", finetune_iters=6)


class Demo:
    def __init__(self, out: str, settings: Settings):
        self.out, self.s = out, settings
        self.stage = 0
        self.timings: dict[str, float] = {}
        self.summary: dict = {"output": out, "settings": {k: v for k, v in asdict(settings).items() if k != "corpus"}}

    @staticmethod
    def path(*parts: str) -> str:
        """A path under --out, relative to it (the working folder of the demo and its commands)."""
        return os.path.join(*parts)

    def banner(self, title: str) -> float:
        self.stage += 1
        print(f"\n{'━' * 100}\n[{self.stage}/{STAGES}] {title}\n{'━' * 100}", flush=True)
        return time.perf_counter()

    def done(self, key: str, started: float) -> None:
        self.timings[key] = round(time.perf_counter() - started, 1)
        print(f"[{self.stage}/{STAGES}] done in {self.timings[key]:.1f} s", flush=True)

    def run(self, argv: list[str], env: dict | None = None, capture: bool = False) -> str:
        """Run one command with this process's stderr and stdout, so the tool's own progress bars
        show; stop the demo if it fails. With `capture`, also return what it printed."""
        shown = ["python" if a == sys.executable else short_path(a) for a in argv]
        print("$ " + shlex.join(shown), flush=True)
        paths = os.environ.get("PYTHONPATH", "")
        env = dict(os.environ, PYTHONPATH=REPO + (os.pathsep + paths if paths else ""), **(env or {}))
        printed = b""
        with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE if capture else None) as proc:
            while capture and (chunk := os.read(proc.stdout.fileno(), 4096)):
                sys.stdout.buffer.write(chunk)  # as it comes: generate.py streams tokens
                sys.stdout.flush()
                printed += chunk
        if proc.returncode:
            raise SystemExit(f"demo stopped: stage {self.stage} failed (exit {proc.returncode}) in {os.getcwd()}: "
                             f"{shlex.join(shown)}")
        return printed.decode("utf-8", "replace")

    def tool(self, name: str, *args: str, capture: bool = False) -> str:
        return self.run([sys.executable, os.path.join(REPO, "tools", name), *args], capture=capture)

    # -- stages --------------------------------------------------------------------------------
    def corpus(self) -> None:
        t = self.banner("Assemble a raw corpus from text installed with Python and its packages")
        files = assemble_corpus(self.path("raw"), self.s.corpus)
        self.summary["raw"] = {}
        for source, f in files.items():
            print(f"{source:12s} {f.documents:5d} documents, {f.bytes / 1e6:5.2f} MB in {len(f.paths)} files "
                  f"under {os.path.dirname(f.paths[0])}")
            for origin, n in f.origins.items():
                print(f"{'':14s}{n:5d}  {origin}")
            for reason, n in f.skipped.items():
                print(f"{'':14s}{n:5d}  not exported: {reason}")
            self.summary["raw"][source] = {"documents": f.documents, "bytes": f.bytes, "origins": f.origins,
                                           "not_exported": f.skipped, "files": f.paths}
        print("(github licences: each package's own metadata; the standard library is psf-2.0)")
        self.done("corpus", t)

    def clean(self) -> None:
        t = self.banner("Clean each source with its LLaMA recipe (tools/clean_corpus.py)")
        self.summary["clean"] = {}
        for source in ("c4", "commoncrawl", "github"):  # c4 first: CommonCrawl's n-gram model learns its text
            extra = (["--perplexity-model", self.ngram_model(), "--perplexity-buckets", self.s.perplexity_buckets]
                     if source == "commoncrawl" else [])
            report = self.path("cleaned", f"{source}.report.json")
            self.tool("clean_corpus.py", "--source", source, "--input", self.path("raw", source),
                      "--output", self.path("cleaned", source), "--report", report,
                      "--keep-rejected", self.path("rejected", source), *extra)
            with open(report, encoding="utf-8") as f:
                r = json.load(f)
            self.summary["clean"][source] = {"input_docs": r["input_docs"], "kept": r["output_docs"],
                                             "dropped": r["dropped"]}
        self.summary["clean"]["commoncrawl"]["buckets"] = self.bucket_counts()
        print("commoncrawl perplexity buckets: " + ", ".join(
            f"{b} {n}" for b, n in self.summary["clean"]["commoncrawl"]["buckets"].items()))
        self.done("clean", t)

    def ngram_model(self) -> str:
        """CCNet's n-gram filter, with the language reference (c4 here) standing in for Wikipedia:
        its SentencePiece model and 5-gram KenLM model; the bucket cut-offs are the perplexity
        percentiles of the CommonCrawl pages after a first pass without the filter."""
        print("CommonCrawl's n-gram filter: a first pass for the percentile sample, then the model")
        sample = self.path("ngram", "commoncrawl-unfiltered")
        self.tool("clean_corpus.py", "--source", "commoncrawl", "--input", self.path("raw", "commoncrawl"),
                  "--output", sample, "--report", self.path("ngram", "commoncrawl-unfiltered.report.json"))
        self.tool("train_tokenizer.py", "--input", self.cleaned_glob("c4"), "--vocab-size", str(self.s.vocab_size),
                  "--output-prefix", self.path("ngram", "reference"))
        model = self.path("ngram", "en.bin")
        self.tool("train_ngram_lm.py", "--input", *glob.glob(self.cleaned_glob("c4")), "--tokenizer-model",
                  self.path("ngram", "reference.model"), "--order", "5", "--output", model,
                  "--percentiles-from", *glob.glob(os.path.join(sample, "*.jsonl")))
        self.summary["ngram_model"] = model
        return model

    def bucket_counts(self) -> dict[str, int]:
        """CommonCrawl pages per perplexity bucket, kept (cleaned/) or dropped (rejected/)."""
        counts = {"head": 0, "middle": 0, "tail": 0}
        for path in glob.glob(self.cleaned_glob("commoncrawl")) + glob.glob(self.path("rejected", "commoncrawl", "*.jsonl")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    bucket = json.loads(line)["meta"].get("bucket")
                    if bucket:
                        counts[bucket] += 1
        return counts

    def cleaned_glob(self, source: str = "*") -> str:
        """The cleaned JSONL of one source or all (the tools expand the glob themselves)."""
        return self.path("cleaned", source, "*.jsonl")

    def tokenizer(self) -> None:
        t = self.banner(f"Train a SentencePiece BPE tokenizer, {self.s.vocab_size} pieces (tools/train_tokenizer.py)")
        self.tool("train_tokenizer.py", "--input", self.cleaned_glob(), "--vocab-size", str(self.s.vocab_size),
                  "--output-prefix", self.path("tokenizer", "demo"))
        self.summary["tokenizer"] = self.path("tokenizer", "demo.model")
        self.done("tokenizer", t)

    def preprocess(self) -> None:
        t = self.banner("Tokenize each source into Megatron's indexed format (tools/preprocess_data.py)")
        self.summary["tokens"] = {}
        for source in SOURCES:
            self.tool("preprocess_data.py", "--input", self.cleaned_glob(source), "--output-prefix",
                      self.path("data", source), "--tokenizer-type", "SentencePieceTokenizer",
                      "--tokenizer-model", self.summary["tokenizer"], "--append-eod", "--workers", "1")
            self.summary["tokens"][source] = IndexedDataset(self.data_prefix(source)).num_tokens
        s = self.s
        print("the blend of stage 5: LLaMA's sampling proportions, and the epochs they mean here")
        self.tool("mixture_report.py", "--data-path", *self.blend(),
                  "--train-tokens", str(s.train_iters * s.global_batch * s.seq_length))
        self.done("preprocess", t)

    def blend(self) -> list[str]:
        """Megatron's --data-path: weight, prefix, weight, prefix, ..."""
        return [x for source in SOURCES for x in (str(WEIGHTS[source]), self.data_prefix(source))]

    def data_prefix(self, source: str) -> str:
        return self.path("data", f"{source}_text_document")

    def pretrain(self) -> None:
        s = self.s
        t = self.banner(f"Pretrain a {s.num_layers}-layer LLaMA, TP=2 x PP=2 on 4 CPU processes "
                        "(torchrun -m megallama.pretrain)")
        eval_interval = max(s.train_iters // 6, 1)
        self.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                  "-m", "megallama.pretrain",
                  "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                  "--num-layers", str(s.num_layers), "--hidden-size", str(s.hidden_size),
                  "--untie-embeddings-and-output-weights",  # LLaMA's; explicit shapes alone mean tied (Megatron)
                  "--num-attention-heads", str(s.heads), "--seq-length", str(s.seq_length),
                  "--micro-batch-size", str(s.micro_batch), "--global-batch-size", str(s.global_batch),
                  "--train-iters", str(s.train_iters), "--lr", str(s.lr),
                  "--lr-warmup-iters", str(max(s.train_iters // 10, 1)),
                  "--data-path", *self.blend(), "--split", "90,10,0",
                  "--tokenizer-model", self.summary["tokenizer"],
                  "--save", self.path("checkpoints"), "--save-interval", str(s.train_iters),
                  "--log-interval", str(s.log_interval), "--eval-interval", str(eval_interval), "--eval-iters", "4",
                  "--tensorboard-dir", self.path("tensorboard")],
                 # one thread per process: 4 processes already cover the cores; more only contend
                 env={"OMP_NUM_THREADS": "1"})
        self.summary["training"] = training_figures(self.path("tensorboard"))
        self.summary["checkpoints"] = self.path("checkpoints")
        self.summary["tensorboard"] = self.path("tensorboard")
        self.summary["loss_curve"] = plot_loss_curve(self.path("tensorboard"), self.path("loss_curve.png"))
        print(f"loss curve: {self.summary['loss_curve']}")
        self.done("pretrain", t)

    def export(self) -> None:
        t = self.banner("Export the checkpoint to Hugging Face format (tools/convert_checkpoint.py)")
        self.tool("convert_checkpoint.py", "--target-format", "hf", "--load", self.path("checkpoints"),
                  "--save", self.path("hf"), "--tokenizer-model", self.summary["tokenizer"])
        self.summary["hf"] = self.path("hf")
        self.done("export", t)

    def generate(self) -> None:
        t = self.banner("Generate continuations with the exported model (tools/generate.py)")
        prompts = [x for prompt in PROMPTS for x in ("--prompt", prompt)]
        printed = self.tool("generate.py", "--load", self.path("hf"), "--tokenizer-model", self.summary["tokenizer"],
                            *prompts, "--max-new-tokens", str(self.s.max_new_tokens), *SAMPLING, capture=True)
        with atomic_open(self.path("generations.txt"), "w") as f:
            f.write(printed)
        self.summary["generations"] = self.path("generations.txt")
        self.done("generate", t)

    def instructions(self) -> None:
        t = self.banner("Build an instruction set from the language reference and tokenize it with its answer-only "
                        "loss mask (tools/preprocess_instructions.py)")
        path = self.path("instructions", "reference_qa.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        examples = write_jsonl(path, reference_instructions(self.s.corpus.pydoc_topics))
        print(f"{examples} questions and answers in {path}")
        self.tool("preprocess_instructions.py", "--input", path, "--format", "alpaca", "--tokenizer-model",
                  self.summary["tokenizer"], "--output-prefix", self.path("sft", "reference_qa"), "--no-progress")
        self.summary["instructions"] = {"examples": examples, "jsonl": path}
        self.done("instructions", t)

    def chat(self, checkpoint: str) -> str:
        printed = self.tool("generate.py", "--load", checkpoint, "--tokenizer-model", self.summary["tokenizer"],
                            "--chat", "--prompt", CHAT_PROMPT, "--greedy", "--max-new-tokens",
                            str(self.s.max_new_tokens), capture=True)
        return " ".join(printed.split("assistant> ", 1)[-1].split())  # one line for the summary

    def finetune(self) -> None:
        s = self.s
        t = self.banner("Finetune on the instructions (LLaMA-I), TP=2 x PP=2, packed examples; chat before and after "
                        "(torchrun -m megallama.pretrain --finetune, tools/generate.py --chat)")
        before = self.chat(self.path("checkpoints"))
        self.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                  "-m", "megallama.pretrain", "--finetune", "--load", self.path("checkpoints"),
                  "--sft-data-path", self.path("sft", "reference_qa"), "--save", self.path("finetuned"),
                  "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                  "--num-layers", str(s.num_layers), "--hidden-size", str(s.hidden_size),
                  "--untie-embeddings-and-output-weights",  # LLaMA's; explicit shapes alone mean tied (Megatron)
                  "--num-attention-heads", str(s.heads), "--seq-length", str(s.seq_length),
                  "--micro-batch-size", str(s.micro_batch), "--global-batch-size", str(s.global_batch),
                  "--train-iters", str(s.finetune_iters), "--lr", "1e-3", "--lr-warmup-iters", "2",
                  "--split", "100,0,0", "--eval-iters", "0", "--tokenizer-model", self.summary["tokenizer"],
                  "--log-interval", str(s.log_interval), "--tensorboard-dir", self.path("tensorboard_finetune")],
                 env={"OMP_NUM_THREADS": "1"})
        after = self.chat(self.path("finetuned"))
        figures = training_figures(self.path("tensorboard_finetune"))
        self.summary["finetune"] = {"first_loss": figures["first_loss"], "final_loss": figures["final_loss"],
                                    "iterations": figures["iterations"], "prompt": CHAT_PROMPT,
                                    "before": before, "after": after}
        self.summary["finetuned"] = self.path("finetuned")
        self.done("finetune", t)

    def report(self, started: float) -> None:
        self.summary["seconds"] = dict(self.timings, total=round(time.perf_counter() - started, 1))
        write_json(self.path("summary.json"), self.summary)
        print(format_summary(self.summary))


# -- figures -------------------------------------------------------------------------------------
def read_scalars(tensorboard_dir: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of every scalar tag in the event files under `tensorboard_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(glob.glob(os.path.join(tensorboard_dir, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(events)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    if "lm loss" not in series:
        raise RuntimeError(f"no 'lm loss' scalars in {tensorboard_dir}: did training log to TensorBoard?")
    return {tag: sorted(points) for tag, points in series.items()}


def training_figures(tensorboard_dir: str) -> dict:
    """First and last logged training loss, last validation loss, mean tokens/s."""
    scalars = read_scalars(tensorboard_dir)
    loss = scalars["lm loss"]
    speeds = [v for _, v in scalars.get("tokens-per-second", [])]
    # the first report includes start-up (first pipeline fill, warm caches): leave it out
    speeds = speeds[1:] or speeds
    figures = {"first_loss": loss[0][1], "final_loss": loss[-1][1], "iterations": loss[-1][0],
               "tokens_per_second": round(sum(speeds) / len(speeds), 1) if speeds else None}
    if "lm loss validation" in scalars:
        figures["validation_loss"] = scalars["lm loss validation"][-1][1]
    return figures


def plot_loss_curve(tensorboard_dir: str, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(tensorboard_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, style, label in (("lm loss", "-o", "training (mean since the previous point)"),
                              ("lm loss validation", "s--", "validation (held-out 10% of each source)")):
        if tag in scalars:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, style, label=label, markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("megallama demo: TP=2 x PP=2 on 4 CPU processes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(png, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return png


def format_summary(s: dict) -> str:
    lines = ["", "━" * 100, "Summary", "━" * 100, "documents (raw → kept; dropped by reason) and tokens:"]
    for source in SOURCES:
        c = s["clean"][source]
        dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(c["dropped"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  {source:12s} {c['input_docs']:5d} → {c['kept']:5d}  {s['tokens'][source]:>9,d} tokens"
                     f"  weight {WEIGHTS[source]:4.1f}   dropped: {dropped or 'none'}")
        if "buckets" in c:
            lines.append(f"  {'':12s} perplexity buckets (n-gram model): "
                         + ", ".join(f"{b} {n}" for b, n in c["buckets"].items()))
    t = s["training"]
    lines.append(f"training: loss {t['first_loss']:.3f} → {t['final_loss']:.3f} over {t['iterations']} iterations"
                 + (f" (validation {t['validation_loss']:.3f})" if "validation_loss" in t else "")
                 + (f", {t['tokens_per_second']:,.0f} tokens/s" if t["tokens_per_second"] else ""))
    if "finetune" in s:
        f = s["finetune"]
        lines.append(f"finetune: {s['instructions']['examples']} instructions, answer-token loss {f['first_loss']:.3f} "
                     f"→ {f['final_loss']:.3f} over {f['iterations']} iterations")
        lines += [f"  user> {f['prompt']}", f"  before> {f['before']}", f"  after>  {f['after']}"]
    lines.append("written:")
    for label, key in (("raw corpus", "raw"), ("cleaned JSONL", "cleaned"), ("dropped docs", "rejected"),
                       ("tokenizer", "tokenizer"), ("n-gram model", "ngram_model"),
                       ("indexed data", "data"), ("checkpoints", "checkpoints"), ("tensorboard", "tensorboard"),
                       ("loss curve", "loss_curve"), ("HF model", "hf"), ("generations", "generations"),
                       ("finetuned", "finetuned"),
                       ("this summary", "summary.json")):
        value = os.path.join(s["output"], s[key] if isinstance(s.get(key), str) else key)
        lines.append(f"  {label:14s} {value}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items())
    lines.append(f"time: {times}")
    return "\n".join(lines)


def short_path(arg: str) -> str:
    """`arg` relative to the working folder when it is there or one level up, else as given."""
    if not os.path.isabs(arg):
        return arg
    rel = os.path.relpath(arg)
    return arg if rel.startswith(os.path.join("..", "..")) else rel


def prepare_output(out: str) -> None:
    """Start from an empty --out: refuse a non-empty folder the demo did not make."""
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, MARKER)):
            raise SystemExit(f"--out {out} exists, is not empty and was not made by this demo: choose another folder")
        shutil.rmtree(out)
    os.makedirs(out)
    open(os.path.join(out, MARKER), "w").close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out",
                   help="folder for everything the demo writes (default ./demo_out; an earlier demo's "
                        "folder is replaced)")
    p.add_argument("--quick", action="store_true",
                   help="tiny corpus, tiny model, few iterations: the whole chain in a minute or two (tests)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    prepare_output(out)
    os.chdir(out)  # every path below is relative to --out, so the printed commands read short
    print(f"megallama demo{' (--quick)' if args.quick else ''}: writing to {out}; the commands shown run there")
    started = time.perf_counter()
    demo = Demo(out, Settings.quick() if args.quick else Settings.full())
    for stage in (demo.corpus, demo.clean, demo.tokenizer, demo.preprocess, demo.pretrain, demo.export, demo.generate,
                  demo.instructions, demo.finetune):
        stage()
    demo.report(started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
