"""The evaluation report: base and fine-tuned side by side, as Markdown and JSON, written whole."""

import json

from lit_mistral.evaluation.report import build_report, write_report


def test_report_puts_base_and_fine_tuned_side_by_side(tmp_path):
    results = {"base": {"loss": 2.5, "ppl": 12.18, "rougeL": 0.1, "closed_qa/loss": 2.0, "closed_qa/ppl": 7.39},
               "model": {"loss": 2.0, "ppl": 7.39, "rougeL": 0.3, "closed_qa/loss": 1.5, "closed_qa/ppl": 4.48}}
    record = {"index": 0, "instruction": "Name a fish.", "context": "", "reference": "Tope", "category": "closed_qa",
              "finish": "eos", "response_tokens": 3}
    records = {"base": [dict(record, response="I am a model.", rougeL=0.0)],
               "model": [dict(record, response="Tope.", rougeL=1.0)]}
    info = {"model": "tiny", "adapter": "run/adapter", "max_new_tokens": 16, "val_examples": 5,
            "counts": {"all": {"loss": 4, "generation": 1}, "closed_qa": {"loss": 2, "generation": 1}}}
    document, markdown = build_report(results, records, info, n_examples=1)
    assert "4 validation examples for loss" in markdown and "1 more, whose prompt alone is longer" in markdown
    assert "| category | n | metric | base | fine-tuned | change |" in markdown
    assert "| all | 4 | loss (response tokens) | 2.5000 | 2.0000 | -0.5000 |" in markdown
    assert "| all | 1 | ROUGE-L F | 0.1000 | 0.3000 | +0.2000 |" in markdown
    assert "| closed_qa | 2 | perplexity | 7.3900 | 4.4800 | -39.4% |" in markdown
    assert "base (ROUGE-L 0.000): I am a model." in markdown and "fine-tuned (ROUGE-L 1.000): Tope." in markdown
    json_path, md_path = write_report(tmp_path, document, markdown)
    saved = json.loads(json_path.read_text())
    assert saved["metrics"]["fine-tuned"]["rougeL"] == 0.3 and saved["metrics"]["base"]["loss"] == 2.5
    assert saved["examples"][0]["fine-tuned"]["response"] == "Tope."
    assert md_path.read_text() == markdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json", "evaluation.md"]  # no temporaries left
