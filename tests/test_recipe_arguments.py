"""The recipes' argument handling: what is given (not what equals a default), one line for every wrong input."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from beft_trainer.config import BeftConfig, SelectionConfig  # noqa: E402
from beft_trainer.errors import BeftConfigError, DataInputError  # noqa: E402
from beft_trainer.recipes_support import (  # noqa: E402
    DataArguments,
    MethodArguments,
    RecipeArgumentParser,
    RecipeTrainingArguments,
    configure_method,
    get_task,
    load_glue,
    parse_recipe_args,
)
from beft_trainer.recipes_support.command_line import describe_recipe_flags  # noqa: E402

RECIPE_DATACLASSES = (MethodArguments, SelectionConfig, BeftConfig, RecipeTrainingArguments)
SHARED_GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")


@pytest.fixture
def parse(tmp_path):
    """Parse the recipes' dataclasses with a fresh ``--output_dir`` (unless the arguments give one)."""

    def parse(*argv, dataclasses=RECIPE_DATACLASSES):
        output = [] if "--output_dir" in argv else ["--output_dir", str(tmp_path / "out")]
        return parse_recipe_args(dataclasses, [*argv, *output])

    return parse


def test_num_virtual_tokens_is_taken_by_every_method_that_reads_it(parse):
    for method in ("prefix", "prompt_tuning", "p_tuning"):
        assert parse("--method", method, "--num_virtual_tokens", "10")[0].num_virtual_tokens == 10
    with pytest.raises(BeftConfigError, match=r"^--method lora: --num_virtual_tokens would be ignored"):
        parse("--method", "lora", "--num_virtual_tokens", "10")
    assert parse("--method", "lora", "--lora_r", "4", "--lora_alpha", "8")[0].lora_alpha == 8


def test_an_option_the_method_ignores_is_refused_even_at_its_default(parse, tmp_path):
    for argv in (
        ("--probe_steps", "50"),
        ("--candidates", "q,k,v"),
        ("--rewind", "true"),
        ("--no_rewind",),
    ):
        with pytest.raises(BeftConfigError, match="^--method v: --(probe_steps|candidates|rewind) would be ignored"):
            parse("--method", "v", *argv)
    with pytest.raises(BeftConfigError, match="^--method full: --frozen_dtype would be ignored"):
        parse("--method", "full", "--frozen_dtype", "none")
    with pytest.raises(BeftConfigError, match="^--method beft: --lora_r would be ignored"):
        parse("--lora_r", "8")
    (tmp_path / "v.yaml").write_text("method: v\nprobe_steps: 50\n")
    with pytest.raises(BeftConfigError, match="^--method v: --probe_steps would be ignored"):
        parse(str(tmp_path / "v.yaml"))
    # Programmatic callers have no command line: what differs from the defaults is what they set.
    configure_method(MethodArguments(method="v"), SelectionConfig(probe_steps=50), BeftConfig())
    with pytest.raises(BeftConfigError, match="--probe_steps would be ignored"):
        configure_method(MethodArguments(method="v"), SelectionConfig(probe_steps=3), BeftConfig())


def test_a_run_of_zero_steps_is_refused(parse):
    for epochs in ("0", "-1"):
        with pytest.raises(BeftConfigError, match="^--num_train_epochs -?[01] without --max_steps trains nothing"):
            parse("--num_train_epochs", epochs)
    assert parse("--num_train_epochs", "0", "--max_steps", "2")[3].max_steps == 2


def test_out_of_range_values_are_refused_at_parse_time(parse):
    cases = {
        "--lora_r must be >= 1, got 0": ("--method", "lora", "--lora_r", "0"),
        "--lora_r must be >= 1, got -4": ("--method", "lora", "--lora_r", "-4"),
        r"--lora_dropout must lie in \[0, 1\), got 1.5": ("--method", "lora", "--lora_dropout", "1.5"),
        "--num_virtual_tokens must be >= 1": ("--method", "prefix", "--num_virtual_tokens", "0"),
        "--learning_rate must be > 0, got -0.01": ("--learning_rate", "-0.01"),
        "--per_device_train_batch_size must be >= 1, got 0": ("--per_device_train_batch_size", "0"),
        "--gradient_accumulation_steps must be >= 1": ("--gradient_accumulation_steps", "0"),
    }
    for message, argv in cases.items():
        with pytest.raises(BeftConfigError, match=f"^{message}"):
            parse(*argv)


def test_output_dir_must_be_a_folder_no_one_else_wrote_into(parse, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(BeftConfigError, match="^--output_dir .*a_file: a file, not a folder"):
        parse("--output_dir", str(tmp_path / "a_file"))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.txt").write_text("years of work")
    not_ours = r"already holds files that no beft-trainer run wrote \(thesis.txt\)"
    for method in ("full", "lora", "v", "beft"):
        with pytest.raises(BeftConfigError, match=not_ours):
            parse("--method", method, "--output_dir", str(theirs))
    earlier = tmp_path / "earlier"
    (earlier / "checkpoint-2").mkdir(parents=True)
    assert parse("--method", "full", "--output_dir", str(earlier))[0].method == "full"
    (theirs / "eval_results.json").write_text("{}")  # a recipe's earlier full or peft run writes only this
    assert parse("--method", "lora", "--output_dir", str(theirs))[0].method == "lora"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "notes.txt").write_text("kept by the user next to the checkpoints")
    argv = ("--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-2"))
    assert parse("--method", "full", *argv)[3].resume_from_checkpoint.endswith("checkpoint-2")


def test_config_files_that_are_not_options_are_one_line(parse, tmp_path):
    cases = {
        "bad.yaml": ("method: [v\nprobe_steps: 3\n", r"bad.yaml: cannot read the options file \(ParserError: "),
        "scalar.yaml": ("3\n", r"scalar.yaml: holds a int, not options"),
        "list.json": (json.dumps(["method", "v"]), r"list.json: holds a list, not options"),
        "bad.json": ('{"method": ', r"bad.json: cannot read the options file \(JSONDecodeError: "),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(BeftConfigError, match=message) as caught:
            parse(str(tmp_path / name))
        assert "\n" not in str(caught.value)
    (tmp_path / "empty.yaml").write_text("")
    assert parse(str(tmp_path / "empty.yaml"))[0].method == "beft"


def test_data_files_and_data_dir_together_are_refused(tmp_path):
    train, validation = str(tmp_path / "train.jsonl"), str(tmp_path / "validation.jsonl")
    parser = RecipeArgumentParser((DataArguments,))
    message = "^--data_dir /nonexistent with --train_file/--validation_file: .*not both"
    with pytest.raises(DataInputError, match=message):
        parser.parse_args_into_dataclasses(
            ["--train_file", train, "--validation_file", validation, "--data_dir", "/nonexistent"]
        )
    with pytest.raises(DataInputError, match=message):
        load_glue(get_task("rte"), train, validation, data_dir="/nonexistent")


def test_help_says_what_the_recipes_do_with_a_flag(parse):
    parser = RecipeArgumentParser(RECIPE_DATACLASSES)
    describe_recipe_flags(parser)
    text = parser.format_help()
    actions = {option: action for action in parser._actions for option in action.option_strings}
    assert actions["--bias_types"].help.startswith("Refused by the recipes: --method alone says what trains")
    assert actions["--no_rewind"].help == "Turn --rewind off (the same as --rewind false)."
    assert "Turn --eval_on_start off (the same as --eval_on_start false).\n" in text.replace("\n" + " " * 24, " ")
    assert parse("--no_rewind")[1].rewind is False and parse()[1].rewind is True


def test_one_candidate_names_the_flag_that_trains_it(parse):
    with pytest.raises(BeftConfigError, match="^--candidates v: .* use --method v"):
        parse("--candidates", "v")
    with pytest.raises(BeftConfigError, match="^--candidates v: .* use --method v"):
        parse("--candidates", "v", "--method", "v")
