"""lm-eval on our checkpoints equals lm-eval's own `hf` model on the exported directory.

Local task YAMLs over local jsonl files cover the three scoring request types of Table 1
(multiple_choice: HellaSwag/PIQA/WinoGrande; loglikelihood: LAMBADA; loglikelihood_rolling:
WikiText) plus generate_until; documents are longer than the model's 64-token context so rolling
windows and left truncation are exercised.
"""
from __future__ import annotations

import json
import math

import pytest

from megatron_selfroute.checkpoint.consolidated import load_checkpoint
from megatron_selfroute.checkpoint.hf_export import export_hf
from tests.integration.helpers import corpus_lines, random_model, run_main, save_model, tiny_config

TASKS = {
    "local_mc": ("multiple_choice", "mc.jsonl", """
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""),
    "local_lambada": ("loglikelihood", "lambada.jsonl", """
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' ' + text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""),
    "local_wikitext": ("loglikelihood_rolling", "wiki.jsonl", """
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
"""),
    "local_gen": ("generate_until", "gen.jsonl", """
doc_to_text: "{{q}}"
doc_to_target: "{{a}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""),
}


def write_tasks(root) -> str:
    lines = corpus_lines(60)
    docs = {
        "mc.jsonl": [{"query": lines[i], "choices": [lines[i + 1][:40], lines[i + 2][:25],
                                                     " " + lines[i + 3][:30]], "gold": i % 3}
                     for i in range(0, 24, 4)],
        "lambada.jsonl": [{"text": " ".join(lines[i:i + 2])} for i in range(24, 36, 2)],
        "wiki.jsonl": [{"page": "\n".join(lines[i:i + 6])} for i in range(36, 54, 6)],
        "gen.jsonl": [{"q": lines[i], "a": lines[i + 1][:10]} for i in range(54, 59)],
    }
    for name, rows in docs.items():
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, (kind, data, body) in TASKS.items():
        (root / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {root / data}\ntest_split: test\noutput_type: {kind}\n{body}")
    return str(root)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evallm")
    tasks_dir = root / "tasks"
    tasks_dir.mkdir()
    out = {"tasks": write_tasks(tasks_dir)}
    for kind, router in (("moe", "self"), ("dense", None), ("sigmoid-bias-shared", "learned")):
        cfg = tiny_config(router, vocab=50257, seq=64, tokenizer="GPT2BPETokenizer")
        if kind == "sigmoid-bias-shared":  # issue 16's options in the remote-code model
            cfg.moe.moe_router_score_function = "sigmoid"
            cfg.moe.moe_router_enable_expert_bias = True
            cfg.moe.moe_shared_expert_intermediate_size = 24
        ckpt = save_model(random_model(cfg, seed=3, scale=0.2), root / kind)
        export_hf(load_checkpoint(str(ckpt)), str(root / f"{kind}_hf"), str(ckpt))
        out[kind] = (str(ckpt), str(root / f"{kind}_hf"))
    return out


def _per_request(results: dict, task: str) -> list:
    return [[r[0] if isinstance(r, (list, tuple)) else r for r in s["resps"]]
            for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _close(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, str):
        return a == b
    if isinstance(a, bool) or a is None:
        return a == b
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4)


@pytest.mark.parametrize("kind,tasks", [("moe", list(TASKS)),
                                        ("dense", ["local_wikitext", "local_mc"]),
                                        ("sigmoid-bias-shared", ["local_wikitext", "local_mc"])])
def test_scores_equal_lm_eval_hf_model(setup, kind, tasks):
    from megatron_selfroute.eval.lm_eval_adapter import MegatronSelfRouteLM
    from megatron_selfroute.eval.lm_eval_report import evaluate

    ckpt, hf_dir = setup[kind]
    ours = evaluate(MegatronSelfRouteLM(ckpt, batch_size=3), tasks, setup["tasks"],
                    batch_size=3, log_samples=True)
    theirs = evaluate("hf", tasks, setup["tasks"], batch_size=3, log_samples=True,
                      model_args={"pretrained": hf_dir, "trust_remote_code": kind != "dense",
                                  "device": "cpu"})
    for task in tasks:
        mine, ref = _per_request(ours, task), _per_request(theirs, task)
        assert _close(mine, ref), (task, mine[:2], ref[:2])
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert _close(ours["results"][task][metric], value), (task, metric)
    if kind == "moe":  # the windows really rolled and the model really answered
        assert len(ours["samples"]["local_wikitext"]) == 3
        assert any(r for r in _per_request(ours, "local_gen"))


def test_cli_table_json_csv(setup, tmp_path):
    ckpt, _ = setup["moe"]
    out = tmp_path / "res" / "eval.json"
    code, stdout, err = run_main("eval_lm.py", "--load", ckpt, "--tasks",
                                 "local_mc,local_wikitext", "--include-path", setup["tasks"],
                                 "--batch-size", "4", "--output", str(out), "--label", "tiny")
    assert code == 0, err
    assert "| tiny |" in stdout and "local_wikitext (word_perplexity)" in stdout
    saved = json.loads(out.read_text())
    rows = {(r["task"], r["metric"]): r["value"] for r in saved["summary"]}
    assert rows[("local_wikitext", "word_perplexity")] == pytest.approx(
        saved["results"]["local_wikitext"]["word_perplexity,none"])
    csv_lines = out.with_suffix(".csv").read_text().splitlines()
    assert csv_lines[0] == "task,metric,value,stderr" and len(csv_lines) == 1 + len(rows)
    code, _, err = run_main("eval_lm.py", "--load", str(tmp_path / "nope"))
    assert code == 1 and err.strip().count("\n") == 0 and "nope" in err
