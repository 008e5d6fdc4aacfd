"""The ``megallama`` lm-eval model against lm-eval's own ``hf`` model on the HF export of the same
checkpoint, offline, on local tasks: MMLU's format 5-shot (loglikelihood), a perplexity task
(loglikelihood_rolling) and a generation task (generate_until) — equal per-request results."""
import json
import os
import random

import pytest

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"  # nothing may be downloaded; tasks read local JSON
lm_eval = pytest.importorskip("lm_eval")

from tests.finetune.conftest import WORDS  # noqa: E402

SUBJECTS = ("astronomy", "anatomy")
MMLU_TEXT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\n"
             "Answer:")


def _questions(rng, n):
    return [{"question": " ".join(rng.choice(WORDS) for _ in range(6)) + "?",
             "choices": [" ".join(rng.choice(WORDS) for _ in range(2)) for _ in range(4)],
             "answer": rng.randrange(4)} for _ in range(n)]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def write_tasks(folder) -> list[str]:
    rng = random.Random(0)
    names = []
    for subject in SUBJECTS:  # MMLU's layout: a dev split of 5 for the shots, a test split scored
        dev = _write(folder / f"{subject}_dev.jsonl", _questions(rng, 5))
        test = _write(folder / f"{subject}_test.jsonl", _questions(rng, 6))
        name = f"tiny_mmlu_{subject}"
        (folder / f"{name}.yaml").write_text(json.dumps({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"dev": dev, "test": test}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice", "doc_to_text": MMLU_TEXT, "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer", "metric_list": [{"metric": "acc"}]}))
        names.append(name)
    texts = _write(folder / "texts.jsonl", [{"text": " ".join(rng.choice(WORDS) for _ in range(n))}
                                            for n in (20, 300, 45)])
    (folder / "tiny_rolling.yaml").write_text(json.dumps({
        "task": "tiny_rolling", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": texts}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
        "doc_to_target": "{{text}}", "metric_list": [{"metric": "word_perplexity"}]}))
    qa = _write(folder / "qa.jsonl", [{"q": " ".join(rng.choice(WORDS) for _ in range(5)), "a": "paris"}
                                      for _ in range(3)])
    (folder / "tiny_generate.yaml").write_text(json.dumps({
        "task": "tiny_generate", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": qa}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "Q: {{q}}\nA:",
        "doc_to_target": "{{a}}", "generation_kwargs": {"until": ["\n", "?"], "max_gen_toks": 10, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    return names


def evaluate(model, tasks, folder, shots, **kw):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=tasks, num_fewshot=shots, log_samples=True,
                           task_manager=TaskManager(include_path=str(folder), include_defaults=False), **kw)


def flatten(value) -> list:
    """A sample's responses as a flat list of floats, bools and strings."""
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in flatten(v)]
    return [value]


def responses(result, task):
    return [[r for r in s["resps"]] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def test_megallama_model_equals_lm_eval_hf_model_on_the_export(exported, tmp_path):
    from megallama.inference.lm_eval_adapter import MegallamaLM

    mmlu = write_tasks(tmp_path)
    ours_model = MegallamaLM(load=exported["megallama"], batch_size=4)  # saved for TP=2, loaded serially
    hf_args = {"model": "hf", "model_args": f"pretrained={exported['hf']},dtype=float32", "batch_size": 4,
               "device": "cpu"}
    for tasks, shots in ((mmlu, 5), (["tiny_rolling", "tiny_generate"], 0)):
        ours = evaluate(ours_model, tasks, tmp_path, shots)
        theirs = evaluate(tasks=tasks, folder=tmp_path, shots=shots, **hf_args)
        for task in tasks:
            mine, ref = responses(ours, task), responses(theirs, task)
            assert len(mine) == len(ref) > 0
            for a, b in zip(mine, ref):
                a, b = flatten(a), flatten(b)
                assert [type(x) for x in a] == [type(x) for x in b]
                for x, y in zip(a, b):  # log-likelihoods close, greedy flags and texts equal
                    assert x == (pytest.approx(y, rel=1e-4, abs=1e-4) if isinstance(y, float) else y)
            for metric, value in theirs["results"][task].items():
                if isinstance(value, float) and "stderr" not in metric:
                    assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    assert any(r["resps"][0][0] for r in ours["samples"]["tiny_generate"])  # something was generated


def test_tensor_parallel_under_torchrun_equals_serial(exported, tmp_path, sp_model):
    """`torchrun --nproc-per-node 2 tools/run_lm_eval.py run --model megallama …`: the two processes
    are TP ranks of one model; the log-likelihoods equal the serial adapter's."""
    import glob
    import subprocess
    import sys

    from megallama.inference.lm_eval_adapter import MegallamaLM
    from tests.training.test_pretrain_cli import free_port

    task = write_tasks(tmp_path)[0]
    serial = evaluate(MegallamaLM(load=exported["megallama"], batch_size=4), [task], tmp_path, 5)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", os.path.join(repo, "tools", "run_lm_eval.py"), "run",
               "--model", "megallama", "--model_args", f"load={exported['megallama']},tokenizer_model={sp_model}",
               "--tasks", task, "--include_path", str(tmp_path), "--num_fewshot", "5", "--batch_size", "4",
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(task) >= 1  # the results table, printed by rank 0 only
    samples = [json.loads(line) for path in glob.glob(str(tmp_path / "out" / "**" / f"samples_{task}_*.jsonl"),
                                                      recursive=True) for line in open(path)]
    got = {s["doc_id"]: flatten(s["resps"]) for s in samples}
    want = {s["doc_id"]: flatten(s["resps"]) for s in serial["samples"][task]}
    assert sorted(got) == sorted(want) and got
    for doc, values in want.items():  # lm-eval's sample files hold the numbers as strings
        assert len(got[doc]) == len(values)
        for x, y in zip(got[doc], values):
            assert (float(x) == pytest.approx(y, rel=1e-4, abs=1e-4)) if isinstance(y, float) else str(x) == str(y)


def test_model_args_typos_are_refused_and_lm_evals_own_args_accepted(exported, sp_model, tmp_path, monkeypatch,
                                                                     capsys):
    import sys

    from megallama.inference.lm_eval_adapter import MegallamaLM, ModelArgsError
    from tests.data.helpers import load_tool

    # tokenizer= for tokenizer_model= used to run without the tokenizer it named
    with pytest.raises(ModelArgsError, match="unknown megallama model_args tokenizer; it takes load, tokenizer_model, "
                                             "batch_size, max_length, max_gen_toks, dtype"):
        MegallamaLM(load=exported["megallama"], tokenizer=sp_model)
    with pytest.raises(ModelArgsError, match="checkpoint folder .*typo does not exist"):  # printed in one line
        MegallamaLM(load=str(tmp_path / "typo"))
    # what lm-eval's simple_evaluate adds for every model, and --trust_remote_code's entry
    lm = MegallamaLM.create_from_arg_obj({"load": exported["megallama"], "trust_remote_code": True},
                                         {"batch_size": "auto:4", "max_batch_size": 16, "device": "cpu"})
    assert lm.batch_size == 8
    task = write_tasks(tmp_path)[0]
    monkeypatch.setattr(sys, "argv", ["run_lm_eval.py", "run", "--model", "megallama", "--model_args",
                                      f"load={exported['megallama']},tokenizer={sp_model}", "--tasks", task,
                                      "--include_path", str(tmp_path)])
    assert load_tool("run_lm_eval").main() == 2  # not a traceback: main() returned
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: unknown megallama model_args tokenizer; it takes load, tokenizer_model, batch_size, max_length, "
        "max_gen_toks, dtype (and lm-eval's own max_batch_size, device, trust_remote_code)"]


def test_generate_until_follows_do_sample_and_temperature(exported):
    from types import SimpleNamespace

    import torch

    from megallama.inference.lm_eval_adapter import MegallamaLM

    lm = MegallamaLM(load=exported["megallama"])

    def generate_until(**gen_kwargs):
        torch.manual_seed(0)  # lm-eval's --seed; unseeded sampling follows it
        request = SimpleNamespace(args=("Q: the cat sat on\nA:", {"until": ["\n\n"], "max_gen_toks": 12, **gen_kwargs}))
        return lm.generate_until([request], disable_tqdm=True)[0]

    greedy = generate_until(do_sample=False)
    assert generate_until(do_sample=True, temperature=0.0) == greedy  # temperature 0 is greedy decoding
    sampled = generate_until(do_sample=True, temperature=5.0)
    assert sampled != greedy and sampled == generate_until(do_sample=True, temperature=5.0)  # do_sample was ignored
    with pytest.raises(ValueError, match="max_gen_toks=512 leaves no context in max_length=512"):
        generate_until(max_gen_toks=512)
