"""tp-run's input forms and profiling, on the real tokenizer of SmolLM2."""

import json

import pytest

from helpers import run_ranks, tool, tp_run_json
from tp_runtime.convert.pipeline import convert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(smollm2_hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tp1"
    convert(smollm2_hf, str(path), 1, progress=False)
    return str(path)


def test_input_file_txt_json_and_ids_agree(engine, tmp_path):
    prompts = ["What is 2 + 2?", "Name a colour."]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    flags = ["--max_output_len", "6", "--ignore_eos"]
    from_txt = tp_run_json(engine, 1, ["--input_file", str(tmp_path / "p.txt"), *flags])
    from_json = tp_run_json(engine, 1, ["--input_file", str(tmp_path / "p.json"), *flags])
    from_text = tp_run_json(engine, 1, ["--input_text", *prompts, *flags])
    assert from_txt["outputs"] == from_json["outputs"] == from_text["outputs"]
    ids = [o["input_ids"] for o in from_text["outputs"]]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    from_ids_file = tp_run_json(engine, 1, ["--input_file", str(tmp_path / "ids.json"), *flags])
    from_ids = tp_run_json(engine, 1, ["--input_ids", *(",".join(map(str, i)) for i in ids), *flags])
    assert [o["output_ids"] for o in from_ids_file["outputs"]] == [o["output_ids"] for o in from_text["outputs"]]
    assert from_ids["outputs"] == from_ids_file["outputs"]


def test_no_prompt_template_and_run_profiling(engine):
    plain = tp_run_json(engine, 1, ["--input_text", "Hello", "--no_prompt_template", "--max_output_len", "4"])
    assert plain["outputs"][0]["input_ids"] == [19556]  # "Hello" alone, no chat template around it
    res = run_ranks(1, [tool("tp-run"), "--engine", engine, "--input_text", "Hi", "--max_output_len", "4",
                        "--run_profiling"])
    assert res.returncode == 0 and "profiling, median of 3" in res.stderr


@pytest.mark.parametrize("content,needle", [("", "has no prompts"), ('{"a": 1}', "must hold a JSON list")])
def test_bad_input_files(engine, tmp_path, content, needle):
    path = tmp_path / ("p.txt" if not content else "p.json")
    path.write_text(content)
    res = run_ranks(1, [tool("tp-run"), "--engine", engine, "--input_file", str(path)])
    assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr
