"""tools/evaluate.py end to end on tiny exports (MM v2 and Llama): every suite writes its JSON
and table, compare puts them side by side and plots them, the lm-eval wrapper runs a local task,
bad options fail naming the option or file, and (slow) a Megatron checkpoint is evaluated."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from eval_fixtures import llama_export, mm_export
from paths import ROOT

from mm_megatron.eval.icl_data import synthetic_examples, write_examples

_spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "tools" / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_models")
    return {"mm": mm_export(tmp), "llama": llama_export(tmp)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_inputs")
    write_examples(tmp / "syn.jsonl", synthetic_examples(3, 8, seed=0))
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": f"Fact {i}: the code of item {i} is Z{i}.",
                        "qas": [
                            {
                                "question": f"What is the code of item {i}?",
                                "answers": [{"text": f"Z{i}"}],
                            }
                        ],
                    }
                ]
            }
            for i in range(6)
        ]
    }
    (tmp / "squad.json").write_text(json.dumps(squad))
    rows = [
        {"context": "the cat sat on", "choices": [" the mat", " hello"], "label": 0},
        {"context": "VAR ABCDE =", "choices": [" 12345", " the cat"], "label": 0},
    ]
    (tmp / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "mm_eval_mc.yaml").write_text(
        "task: mm_eval_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n"
    )
    return tmp


def _run(argv, capsys):
    rc = evaluate.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


RESULTS: dict[str, object] = {}  # result files of the suites, compared at the end


@pytest.mark.parametrize("name", ["mm", "llama"])
def test_ruler_and_icl(name, exports, inputs, tmp_path_factory, capsys):
    tmp_path = tmp_path_factory.mktemp(f"results_{name}")
    results = RESULTS
    for model in [exports[name]]:
        out = tmp_path / f"{name}_ruler.json"
        rc, stdout, err = _run(
            [
                "ruler",
                "--model",
                model,
                "--tasks",
                "niah_single_1,niah_multiquery,vt,qa_squad",
                "--qa-file",
                inputs / "squad.json",
                "--lengths",
                "700,1024",
                "--samples",
                2,
                "--max-new-tokens",
                8,
                "--save-predictions",
                "--out",
                out,
                "--label",
                name,
            ],
            capsys,
        )
        assert rc == 0, err
        doc = json.loads(out.read_text())
        assert doc["suite"] == "ruler" and doc["model"]["arch"] == name
        rows = {(r["task"], r["x"]): r for r in doc["rows"]}
        assert rows[("niah_single_1", 1024)]["n"] == 2 and 0 <= rows[("vt", 1024)]["score"] <= 100
        assert rows[("vt", 700)]["score"] is None  # too short for the task: skipped
        assert ("ruler_avg", 700) in rows and "niah_single_1" in stdout and "wrote" in stdout
        preds = doc["details"]["predictions"]
        assert all(p["prompt_tokens"] + 8 <= p["length"] for p in preds)
        assert "ruler [" in err  # progress bar
        results[f"{name}_ruler"] = out
        out = tmp_path / f"{name}_icl.json"
        rc, stdout, err = _run(
            [
                "icl",
                "--model",
                model,
                "--data",
                inputs / "syn.jsonl",
                "--shots",
                "1,2,50",
                "--test-size",
                4,
                "--max-context",
                4096,
                "--out",
                out,
                "--label",
                name,
                "--quiet",
            ],
            capsys,
        )
        assert rc == 0, err
        doc = json.loads(out.read_text())
        best = [r for r in doc["rows"] if r["metric"] == "acc (best template)"]
        assert sorted((r["variant"], r["x"]) for r in best) == [
            ("anonymous labels", 1),
            ("anonymous labels", 2),
            ("real labels", 1),
            ("real labels", 2),
        ]
        assert "fewer than 50 shots" in doc["details"]["settings"]["real/k=50"]["skipped"]
        results[f"{name}_icl"] = out


def test_lm_eval_wrapper_on_a_local_task(exports, inputs, tmp_path, capsys):
    out = tmp_path / "mm_lm_eval.json"
    rc, stdout, err = _run(
        [
            "lm-eval",
            "--model",
            exports["mm"],
            "--tasks",
            "mm_eval_mc",
            "--include-path",
            inputs / "tasks",
            "--offline",
            "--out",
            out,
            "--label",
            "mm",
            "--quiet",
        ],
        capsys,
    )
    assert rc == 0, err
    doc = json.loads(out.read_text())
    assert [(r["task"], r["metric"], r["n"]) for r in doc["rows"]] == [("mm_eval_mc", "acc", 2)]
    assert doc["rows"][0]["score"] in (0.0, 50.0, 100.0)
    RESULTS["mm_lm_eval"] = out


def test_compare_side_by_side_and_plots(tmp_path, capsys):
    if len(RESULTS) < 5:
        pytest.skip("needs the result files of the tests above (run the whole module)")
    results = {k: v for k, v in RESULTS.items() if k != "mm_lm_eval"}
    rc, stdout, err = _run(["--compare", *results.values(), RESULTS["mm_lm_eval"]], capsys)
    assert rc == 0, err
    header = stdout.splitlines()[0].split()
    assert header[-2:] == ["mm", "llama"]  # one column per model, suites merged
    assert any(line.startswith("lm-eval") for line in stdout.splitlines())
    pytest.importorskip("matplotlib")
    rc, stdout, err = _run(["compare", *results.values(), "--plots", tmp_path / "plots"], capsys)
    assert rc == 0, err
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert "ruler-niah_single_1-string_match_all.png" in pngs
    assert "icl-syn-acc_best_template.png" in pngs
    assert all((tmp_path / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["ruler", "--lengths", "4k,abc"], "--lengths: 'abc' is not a whole number"),
        (["ruler", "--tasks", "niah_single_9"], "--tasks: unknown 'niah_single_9'"),
        (["ruler", "--tasks", "qa_squad"], "--tasks qa_squad: needs a --qa-file"),
        (["ruler", "--samples", "0"], "--samples: must be >= 1"),
        (
            ["ruler", "--haystack-corpus", "nowhere.jsonl"],
            "--haystack-corpus nowhere.jsonl: neither",
        ),
        (["icl", "--data", "missing.jsonl"], "missing.jsonl: not found"),
        (["icl", "--data", "{syn}", "--labels", "real,fake"], "--labels: unknown 'fake'"),
        (["icl", "--data", "{syn}", "--shots", "0"], "--shots: 0 is below the minimum 1"),
        (
            ["lm-eval", "--tasks", "no_such_task_xyz"],
            "--tasks: unknown to lm-eval: no_such_task_xyz",
        ),
        (["lm-eval", "--tasks", "x", "--include-path", "nowhere"], "--include-path nowhere: not a"),
    ],
)
def test_bad_options_fail_naming_the_option(argv, message, exports, inputs, capsys):
    argv = [a.replace("{syn}", str(inputs / "syn.jsonl")) for a in argv]
    rc, _, err = _run([*argv, "--model", exports["mm"]], capsys)
    assert rc == 2 and message in err, err


def test_bad_model_paths_and_no_ltm(exports, tmp_path, capsys):
    rc, _, err = _run(["ruler", "--model", tmp_path], capsys)
    assert rc == 2 and "no config.json (not a Hugging Face export)" in err
    rc, _, err = _run(["ruler", "--megatron-checkpoint", tmp_path / "nope"], capsys)
    assert rc == 2 and "--megatron-checkpoint" in err and "not a directory" in err
    rc, _, err = _run(
        [
            "ruler",
            "--model",
            exports["llama"],
            "--no-ltm",
            "--lengths",
            "512",
            "--tasks",
            "niah_single_1",
            "--samples",
            1,
        ],
        capsys,
    )
    assert rc == 2 and "--no-ltm: the model is llama, not MM v2" in err
    if importlib.util.find_spec("mm_megatron.eval.ltm_ablation") is None:
        rc, _, err = _run(
            [
                "ruler",
                "--model",
                exports["mm"],
                "--no-ltm",
                "--lengths",
                "512",
                "--tasks",
                "niah_single_1",
                "--samples",
                1,
            ],
            capsys,
        )
        assert rc == 2 and "--no-ltm: not available" in err


@pytest.mark.slow
def test_megatron_checkpoint_is_converted_and_evaluated(exports, inputs, tmp_path):
    """A model-only Megatron checkpoint (converted from the MM export) gives the same result
    file rows as the export itself."""
    ckpt = tmp_path / "ckpt"
    conv = subprocess.run(
        [
            sys.executable,
            ROOT / "tools" / "convert_checkpoint.py",
            "--to",
            "megatron",
            "--load",
            exports["mm"],
            "--save",
            ckpt,
            "--no-parity",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert conv.returncode == 0, conv.stderr[-2000:]
    rows = []
    for source in (["--megatron-checkpoint", ckpt], ["--model", exports["mm"]]):
        out = tmp_path / f"{source[0].strip('-')}.json"
        res = subprocess.run(
            [
                sys.executable,
                ROOT / "tools" / "evaluate.py",
                "ruler",
                *source,
                "--tasks",
                "niah_single_1,qa_squad",
                "--qa-file",
                inputs / "squad.json",
                "--lengths",
                "600",
                "--samples",
                "2",
                "--save-predictions",
                "--out",
                out,
                "--quiet",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        doc = json.loads(out.read_text())
        rows.append([(p["task"], p["prediction"]) for p in doc["details"]["predictions"]])
    assert doc["model"]["kind"] == "hf"
    assert rows[0] == rows[1]
