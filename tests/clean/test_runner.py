"""The runner: parallel output equals serial output, resume after a crash, rejected documents,
the report, the CLI; and the quality classifier end to end."""

import json
import os
import random
import re
import subprocess
import sys

import pytest

from megallama.clean import runner
from megallama.clean.quality import QualityClassifier, train_quality_classifier
from megallama.clean.runner import clean_corpus
from megallama.clean.sources import make_source
from tests.clean import inputs
from tests.clean.samples import page

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_commoncrawl_shards(folder, n_shards=4, docs=12, seed=0):
    """JSONL shards with lines and documents repeated within and across shards, other languages,
    short documents and broken lines."""
    rng = random.Random(seed)
    shared = [f"Shared navigation line number {i} for every page on this site." for i in range(5)]
    made = []
    for s in range(n_shards):
        rows = []
        for d in range(docs):
            kind = rng.random()
            if kind < 0.15 and made:
                rows.append({"url": f"s{s}/{d}", "text": rng.choice(made)})
            elif kind < 0.25:
                rows.append({"url": f"s{s}/{d}", "text": page(rng, rng.choice(["de", "fr", "es"]))})
            elif kind < 0.3:
                rows.append({"url": f"s{s}/{d}", "text": "Tiny page."})
            else:
                lines = page(rng).split("\n") + rng.sample(shared, 2)
                rng.shuffle(lines)
                made.append("\n".join(lines))
                rows.append({"url": f"s{s}/{d}", "text": made[-1]})
        inputs.write_jsonl(str(folder / f"part-{s}.jsonl"), rows, raw_lines={3: b"{broken"})
    return sorted(str(p) for p in folder.glob("part-*.jsonl"))


def read_output(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if name.endswith(".jsonl")}


def test_parallel_output_equals_serial_and_sequential_reference(tmp_path):
    paths = make_commoncrawl_shards(tmp_path)
    serial = clean_corpus("commoncrawl", paths, str(tmp_path / "w1"), str(tmp_path / "r1.json"), workers=1, progress=False)
    parallel = clean_corpus("commoncrawl", paths, str(tmp_path / "w2"), str(tmp_path / "r2.json"), workers=2, progress=False)
    assert serial == parallel
    assert read_output(tmp_path / "w1") == read_output(tmp_path / "w2")
    # one shard holding everything must give the same documents: dedup is over the whole input
    merged = tmp_path / "merged.jsonl"
    merged.write_bytes(b"".join(open(p, "rb").read() for p in paths))
    single = clean_corpus("commoncrawl", [str(merged)], str(tmp_path / "w3"), str(tmp_path / "r3.json"), progress=False)
    assert single["dropped"] == serial["dropped"] and single["output_docs"] == serial["output_docs"]
    assert b"".join(read_output(tmp_path / "w1").values()) == b"".join(read_output(tmp_path / "w3").values())
    assert serial["dropped"]["bad_json"] == 4 and serial["dropped"]["duplicate"] > 0
    assert serial["dropped"]["language"] > 0


def test_resume_after_crash_gives_the_same_output(tmp_path, monkeypatch):
    paths = make_commoncrawl_shards(tmp_path, seed=1)
    expected = clean_corpus("commoncrawl", paths, str(tmp_path / "ref"), str(tmp_path / "ref.json"), progress=False)

    real_pass2 = runner._pass2
    calls = []

    def crash_on_third(source, shard, *args):
        calls.append(shard.index)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_pass2(source, shard, *args)

    monkeypatch.setattr(runner, "_pass2", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"), progress=False)
    monkeypatch.setattr(runner, "_pass2", real_pass2)
    done = sorted(os.listdir(tmp_path / "out" / ".clean" / "done"))
    assert len(done) == 2 and not (tmp_path / "out.json").exists()
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]

    finished = []
    monkeypatch.setattr(runner, "_pass2", lambda source, shard, *a: finished.append(shard.index) or real_pass2(source, shard, *a))
    report = clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"), progress=False)
    assert finished == [2, 3]  # finished shards are skipped
    assert report == expected
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")
    assert not (tmp_path / "out" / ".clean" / "work").exists()
    # a rerun of a finished run does nothing and reports the same
    finished.clear()
    assert clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"), progress=False) == expected
    assert finished == []


def test_single_pass_resume_and_rejected_documents(tmp_path):
    site = tmp_path / "a.stackexchange.com"
    site.mkdir()
    inputs.write_posts_xml(str(site / "Posts.xml"), [{"Id": 1, "PostTypeId": 1, "Title": "Q", "Body": "<p>B</p>"},
                                                     {"Id": 2, "PostTypeId": 2, "ParentId": 7, "Body": "<p>O</p>"}])
    rej = tmp_path / "rejected"
    report = clean_corpus("stackexchange", [str(tmp_path)], str(tmp_path / "out"), str(tmp_path / "r.json"),
                          keep_rejected=str(rej), progress=False)
    assert report["output_docs"] == 1 and report["dropped"] == {"orphan_answer": 1}
    rows = [json.loads(line) for f in sorted(rej.iterdir()) for line in f.read_text().splitlines()]
    assert [(r["text"], r["meta"]["reason"]) for r in rows] == [("<p>O</p>", "orphan_answer")]
    assert clean_corpus("stackexchange", [str(tmp_path / "a.stackexchange.com")], str(tmp_path / "out"),
                        str(tmp_path / "r.json"), progress=False) == report


def test_a_truncated_archive_keeps_the_documents_before_the_damage(tmp_path):
    rng = random.Random(6)
    rows = [{"url": f"u{i}", "text": page(rng)} for i in range(40)]
    inputs.write_jsonl(str(tmp_path / "whole.jsonl.gz"), rows)
    data = (tmp_path / "whole.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    inputs.write_jsonl(str(tmp_path / "next.jsonl"), [{"url": "n0", "text": page(rng)}])
    report = clean_corpus("commoncrawl", [str(tmp_path / "cut.jsonl.gz"), str(tmp_path / "next.jsonl")],
                          str(tmp_path / "out"), str(tmp_path / "r.json"), progress=False)
    kept = [json.loads(x)["meta"]["url"] for x in (tmp_path / "out" / "commoncrawl-00000.jsonl").read_text().splitlines()]
    assert report["dropped"] == {"unreadable_input": 1}
    assert 10 < len(kept) < 40 and kept == [f"u{i}" for i in range(len(kept))]
    assert report["output_docs"] == len(kept) + 1  # the next shard is cleaned as usual


def test_a_different_run_in_the_same_folder_is_refused(tmp_path):
    paths = make_commoncrawl_shards(tmp_path, n_shards=2, docs=3)
    clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "r.json"), progress=False)
    with pytest.raises(RuntimeError, match="different run"):
        clean_corpus("commoncrawl", paths[:1], str(tmp_path / "out"), str(tmp_path / "r.json"), progress=False)
    with pytest.raises(FileNotFoundError, match="input not found"):
        clean_corpus("commoncrawl", [str(tmp_path / "missing.jsonl")], str(tmp_path / "o2"), str(tmp_path / "r2.json"))
    with pytest.raises(ValueError, match="unknown source"):
        clean_corpus("reddit", paths, str(tmp_path / "o3"), str(tmp_path / "r3.json"))


def test_quality_classifier_separates_reference_pages_and_filters(tmp_path):
    rng = random.Random(5)
    spam_words = "buy cheap best deal click now free casino bonus win prize offer discount online shop".split()
    refs = [page(rng, "en", 8) for _ in range(200)]
    spam = [" ".join(rng.choices(spam_words, k=60)) + "." for _ in range(200)]
    model = str(tmp_path / "quality.bin")
    counts = train_quality_classifier(refs[:150], spam[:150], model, epoch=10, dim=16, bucket=20000)
    assert counts == {"positive": 150, "negative": 150}
    clf = QualityClassifier(model)
    accuracy = (sum(clf.score(t) >= 0.5 for t in refs[150:]) + sum(clf.score(t) < 0.5 for t in spam[150:])) / 100
    assert accuracy >= 0.95
    with pytest.raises(ValueError, match="both classes"):
        train_quality_classifier(refs, [], str(tmp_path / "x.bin"), bucket=1000)

    rows = [{"url": f"r{i}", "text": t} for i, t in enumerate(refs[150:155])]
    rows += [{"url": f"s{i}", "text": "\n".join(" ".join(rng.choices(spam_words, k=12)) for _ in range(8))} for i in range(3)]
    inputs.write_jsonl(str(tmp_path / "cc.jsonl"), rows)
    report = clean_corpus("commoncrawl", [str(tmp_path / "cc.jsonl")], str(tmp_path / "out"), str(tmp_path / "r.json"),
                          quality_model=model, progress=False)
    assert report["dropped"].get("low_quality") == 3 and report["output_docs"] == 5
    kept = [json.loads(line) for line in (tmp_path / "out" / "commoncrawl-00000.jsonl").read_text().splitlines()]
    assert all(d["meta"]["quality_score"] >= 0.5 for d in kept)


def test_cli_prints_kept_and_dropped_and_writes_the_report(tmp_path):
    paths = make_commoncrawl_shards(tmp_path, n_shards=2, docs=6)
    cmd = [sys.executable, os.path.join(REPO, "tools", "clean_corpus.py"), "--source", "commoncrawl", "--input", *paths,
           "--output", str(tmp_path / "out"), "--report", str(tmp_path / "report.json"), "--workers", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert re.search(rf"kept\s+{report['output_docs']}\s", result.stdout)
    for reason, count in report["dropped"].items():
        assert re.search(rf"dropped\s+{count}\s.*{reason}", result.stdout)
    assert "clean commoncrawl" in result.stderr  # the progress bar
    first = json.loads((tmp_path / "out" / "commoncrawl-00000.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "meta"} and {"source", "url", "lang", "lang_score"} <= set(first["meta"])
    bad = subprocess.run(cmd[:4] + ["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"),
                                    "--report", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "input not found" in bad.stderr


def test_train_quality_classifier_cli_reads_jsonl_and_txt(tmp_path):
    rng = random.Random(8)
    inputs.write_jsonl(str(tmp_path / "refs.jsonl"), [{"text": page(rng)} for _ in range(20)])
    for i in range(5):
        (tmp_path / f"random{i}.txt").write_text(" ".join(rng.choices("buy now cheap deal click here free".split(), k=80)))
    # a quoted glob is expanded by the tool (a shell's outgrows the argument limit on a real crawl)
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_quality_classifier.py"), "--positive", str(tmp_path / "refs.jsonl"),
           "--negative", str(tmp_path / "random*.txt"), "--output", str(tmp_path / "q.bin"),
           "--dim", "16", "--bucket", "20000", "--max-per-class", "10"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "trained on 10 reference and 5 random pages" in result.stdout
    assert QualityClassifier(str(tmp_path / "q.bin")).model.get_labels()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"no_text": 1}\n{broken\n')
    skips = subprocess.run(cmd[:3] + [str(tmp_path / "bad.jsonl")] + cmd[4:], capture_output=True, text=True, timeout=60)
    assert skips.returncode == 0, skips.stderr  # bad lines are counted, as by the other tools, not fatal
    assert "trained on 1 reference and 5 random pages" in skips.stdout
    assert "skipped lines: " in skips.stdout and "1 missing key 'text'" in skips.stdout and "1 broken JSON" in skips.stdout
    (tmp_path / "body.jsonl").write_text('{"body": "no text"}\n')
    empty = subprocess.run(cmd[:3] + [str(tmp_path / "body.jsonl")] + cmd[4:], capture_output=True, text=True, timeout=60)
    assert empty.returncode == 1 and empty.stderr.strip() == ("error: need both classes to train: got 0 positive and 5 "
                                                              "negative texts; skipped lines: 1 missing key 'text'")
    typo = subprocess.run(cmd[:3] + [str(tmp_path / "reference*.jsonl")] + cmd[4:], capture_output=True, text=True, timeout=60)
    assert typo.returncode == 1 and typo.stderr.strip() == f"error: --positive '{tmp_path}/reference*.jsonl' matches no file"
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "bad.jsonl")] + cmd[4:] + ["--strict"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == f"error: {tmp_path / 'bad.jsonl'}:2: missing key 'text'"


def test_resume_after_a_crash_in_the_first_pass(tmp_path, monkeypatch):
    paths = make_commoncrawl_shards(tmp_path, seed=2)
    expected = clean_corpus("commoncrawl", paths, str(tmp_path / "ref"), str(tmp_path / "ref.json"), progress=False)
    real_pass1 = runner._pass1
    calls = []

    def crash_on_third(source, shard, *args):
        calls.append(shard.index)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_pass1(source, shard, *args)

    monkeypatch.setattr(runner, "_pass1", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"), progress=False)
    calls.clear()
    monkeypatch.setattr(runner, "_pass1", lambda source, shard, *a: calls.append(shard.index) or real_pass1(source, shard, *a))
    assert clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"), progress=False) == expected
    assert calls == [2, 3]  # shards read before the crash are not read again
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")


def test_a_stage_failing_on_one_document_drops_only_that_document(tmp_path, capsys):
    from megallama.clean.sources.c4 import C4

    class Fragile(C4):
        def pre(self, doc):
            if doc.meta["url"] == "boom":
                raise RecursionError("pathological input")
            return super().pre(doc)

    rng = random.Random(9)
    inputs.write_jsonl(str(tmp_path / "c4.jsonl"), [{"url": u, "text": page(rng)} for u in ("a", "boom", "b")])
    report = clean_corpus(Fragile(), [str(tmp_path / "c4.jsonl")], str(tmp_path / "out"), str(tmp_path / "r.json"),
                          progress=False)
    assert report["dropped"] == {"processing_error": 1} and report["output_docs"] == 2
    assert "boom: RecursionError: pathological input" in capsys.readouterr().err


def test_partition_count_does_not_change_the_output_even_across_a_resume(tmp_path, monkeypatch):
    paths = make_commoncrawl_shards(tmp_path, seed=7)
    expected = clean_corpus("commoncrawl", paths, str(tmp_path / "ref"), str(tmp_path / "ref.json"), progress=False)
    real_pass2 = runner._pass2

    def crash(*args):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(runner, "_pass2", crash)
    with pytest.raises(KeyboardInterrupt):
        clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"), dedup_partitions=2,
                     progress=False)
    monkeypatch.setattr(runner, "_pass2", real_pass2)
    # pass 1 stored its hashes for 2 partitions: with 5 it is redone, the output is the same
    assert clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"), workers=2,
                        dedup_partitions=5, progress=False) == expected
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")


def test_unwritable_destinations_fail_before_any_work(tmp_path, monkeypatch):
    """A --report, --output or --keep-rejected that cannot be written was a traceback, the report's
    only after the whole run."""
    paths = make_commoncrawl_shards(tmp_path, n_shards=1, docs=3)
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir.json").mkdir()
    monkeypatch.setattr(runner, "_clean_shards", lambda *a: pytest.fail("work started"))
    for args, message in [({"report_path": str(tmp_path / "afile" / "r.json")}, "--report: cannot make the folder"),
                          ({"report_path": str(tmp_path / "adir.json")}, "--report " + str(tmp_path / "adir.json") + " is a folder"),
                          ({"output_dir": str(tmp_path / "afile")}, "--output: cannot make the folder"),
                          ({"keep_rejected": str(tmp_path / "afile" / "rej")}, "--keep-rejected: cannot make the folder")]:
        kwargs = {"output_dir": str(tmp_path / "out"), "report_path": str(tmp_path / "r.json"), **args}
        with pytest.raises(ValueError, match=re.escape(message)):
            clean_corpus("commoncrawl", paths, progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_train_quality_classifier_refuses_a_folder_or_a_file_in_the_way_in_one_line(tmp_path):
    """Both were tracebacks, a folder as --output only after training; so was a non-string text."""
    inputs.write_jsonl(str(tmp_path / "refs.jsonl"), [{"text": "a reference page"}])
    inputs.write_jsonl(str(tmp_path / "random.jsonl"), [{"text": "buy now"}])
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_quality_classifier.py"), "--positive",
           str(tmp_path / "refs.jsonl"), "--negative", str(tmp_path / "random.jsonl"), "--bucket", "1000", "--output"]
    for output, message in [("afile/q.bin", f"--output: cannot make the folder {tmp_path / 'afile'}: a file is in the way"),
                            ("adir", "adir is a folder")]:
        bad = subprocess.run(cmd + [str(tmp_path / output)], capture_output=True, text=True, timeout=60)
        err = bad.stderr.strip()
        assert bad.returncode == 1 and len(err.splitlines()) == 1 and message in err, err
    inputs.write_jsonl(str(tmp_path / "refs.jsonl"), [{"text": "a reference page"}, {"text": 5}])  # was an AttributeError
    bad = subprocess.run(cmd + [str(tmp_path / "q.bin"), "--strict"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip() == f"error: {tmp_path / 'refs.jsonl'}:2: key 'text' is not a string"
    for flags, message in [(["--epoch", "0"], "--epoch must be at least 1, got 0"),
                           (["--dim", "-3"], "--dim must be at least 1, got -3"),
                           (["--lr", "0"], "--lr must be positive, got 0"),
                           (["--max-per-class", "0"], "--max-per-class must be at least 1, got 0"),
                           (["--bucket", "0"], "--bucket must be at least 1 with --word-ngrams 2, got 0")]:
        bad = subprocess.run(cmd + [str(tmp_path / "q.bin"), *flags], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.strip().endswith(message), bad.stderr
        assert not (tmp_path / "q.bin").exists()


def test_cli_interrupted_says_how_to_resume_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    from tests.data.helpers import load_tool

    tool = load_tool("clean_corpus")
    paths = make_commoncrawl_shards(tmp_path, n_shards=1, docs=3)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "clean_corpus", interrupted)
    assert tool.main(["--source", "commoncrawl", "--input", *paths, "--output", str(tmp_path / "out"),
                      "--report", str(tmp_path / "r.json")]) == 130
    assert capsys.readouterr().err.strip() == f"interrupted: rerun the same command to finish the shards left in {tmp_path / 'out'}"


def test_a_file_named_twice_is_cleaned_once(tmp_path):
    """A file given by itself and by its folder was two shards: its documents twice in the output
    of a source without dedup (wikipedia, arxiv, stackexchange), and counted twice in the report."""
    (tmp_path / "dumps").mkdir()
    dump = str(tmp_path / "dumps" / "enwiki.xml")
    inputs.write_wiki_dump(dump, [inputs.wiki_page(1, "Llama", "The '''llama''' is a domesticated South American camelid.")])
    report = clean_corpus("wikipedia", [str(tmp_path / "dumps"), dump, os.path.join(str(tmp_path), ".", "dumps", "enwiki.xml")],
                          str(tmp_path / "out"), str(tmp_path / "r.json"), progress=False)
    assert (report["shards"], report["input_docs"], report["output_docs"]) == (1, 1, 1)
    from megallama.clean.sources import make_source

    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "2301.00001.tar").write_bytes(b"")
    tarball = str(tmp_path / "papers" / "2301.00001.tar")
    assert make_source("arxiv").shards([str(tmp_path / "papers"), tarball]) == [tarball]  # arxiv finds its own shards


@pytest.mark.parametrize("workers", [1, 2])
def test_the_dedup_progress_bar_counts_partitions(tmp_path, capsys, workers):
    """Its tasks reported nothing: the bar read "0partition" however far the dedup had gone."""
    source = make_source("commoncrawl")
    kinds = source.exact_dedup + source.line_dedup + (source.near_dedup_threshold is not None)
    paths = make_commoncrawl_shards(tmp_path, n_shards=2, docs=4)
    clean_corpus(source, paths, str(tmp_path / "out"), str(tmp_path / "r.json"), workers=workers, dedup_partitions=3)
    counts = re.findall(r"dedup commoncrawl: (\d+)partition", capsys.readouterr().err)
    assert counts and int(counts[-1]) == 3 * kinds, counts


@pytest.mark.parametrize("source", ["wikipedia", "stackexchange"])
def test_a_non_empty_file_giving_no_document_is_warned_about_and_counted(tmp_path, capsys, source):
    """JSONL given to an XML source read as "0 documents in 1 shards", exit 0 and no word of why."""
    from tests.data.helpers import load_tool

    inputs.write_jsonl(str(tmp_path / "wiki.jsonl"), [{"text": "The llama is a camelid."}])
    (tmp_path / "empty.xml").write_bytes(b"")
    tool = load_tool("clean_corpus")
    assert tool.main(["--source", source, "--input", str(tmp_path / "wiki.jsonl"), str(tmp_path / "empty.xml"),
                      "--output", str(tmp_path / "out"), "--report", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'wiki.jsonl'}: no {source} document in this non-empty file; expected "
                        + make_source(source).input_format]  # the empty file is no mistake
    assert json.loads((tmp_path / "r.json").read_text())["shards_without_documents"] == 1
    assert f"{source}: 0 documents in 2 shards (1 gave none)" in out
