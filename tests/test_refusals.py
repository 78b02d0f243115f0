"""Nothing silent: every wrong use of the trainer and the callback is refused before a step, in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as tf
from helpers import VOCAB, TokenDataset, randomize_biases, snapshot, tiny_bert, tiny_model, training_args

from beft_trainer import (
    BeftConfig,
    BeftConfigError,
    BeftTrainer,
    BiasSelectionCallback,
    BiasTypeError,
    SelectionConfig,
    find_biases,
    load_adapter,
    load_mixed_adapters,
)


def _untouched(model, before) -> bool:
    return all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("with_callback", [False, True], ids=["fixed-types", "selection"])
def test_a_peft_wrapped_model_is_refused(with_callback, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=["query"], r=2))
    kwargs = (
        {"callbacks": [BiasSelectionCallback(probe_steps=2)]}
        if with_callback
        else {"beft_config": BeftConfig(bias_types=("v",))}
    )
    with pytest.raises(BeftConfigError, match="already wrapped by peft") as error:
        BeftTrainer(model, training_args(tmp_path), train_dataset=TokenDataset(), **kwargs)
    assert "add_missing_biases" not in str(error.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"candidates": "qkv"}, r"unknown bias types \['qkv'\]"),
        ({"candidates": "q,,z"}, r"unknown bias types \['z'\]"),
        ({"candidates": ("q", "q", "v")}, "a repeated name"),
        ({"probe_steps": 2.7}, r"probe_steps must be a whole number of steps when >= 1, got 2.7"),
        ({"probe_steps": True}, r"probe_steps must be a step count \(>= 1\) or a share of the run \(< 1\), got True"),
        ({"probe_steps": "50"}, r"probe_steps must be a step count .* got '50'"),
        ({"probe_steps": -0.2}, r"probe_steps must be a step count .* got -0.2"),
        ({"top_k": "1"}, "top_k must be a whole number"),
        ({"rewind": "no"}, "rewind must be True or False"),
        ({"inert_threshold": "small"}, "inert_threshold must be a number"),
        ({"probe_step": 5}, r"unknown options \['probe_step'\]"),
        ({"probe_steps": float("inf")}, r"probe_steps must be a step count .* got inf"),
        ({"budget": float("nan")}, r"budget must be a parameter count \(>= 1\) or a share of the model .* got nan"),
        ({"budget": float("inf")}, r"budget must be a parameter count .* got inf"),
        ({"budget": 2500.7}, r"budget must be a whole number of parameters when >= 1, got 2500.7"),
    ],
)
def test_bad_selection_options_say_which_and_why(options, message):
    with pytest.raises(BeftConfigError, match=message):
        BiasSelectionCallback(**options)


def test_a_comma_list_of_candidates_is_the_same_as_a_tuple():
    assert BiasSelectionCallback(candidates="q,v").candidates == ("q", "v")
    assert BiasSelectionCallback(candidates=["q,v", "k"]).candidates == ("q", "v", "k")
    config = SelectionConfig(probe_steps=7, candidates=("q", "v"))
    assert BiasSelectionCallback(config).config is config and BiasSelectionCallback(config).probe_steps == 7
    with pytest.raises(BeftConfigError, match="not both"):
        BiasSelectionCallback(config, probe_steps=3)


def test_the_callback_class_instead_of_an_instance_is_refused(tmp_path):
    with pytest.raises(BeftConfigError, match="pass an instance"):
        BeftTrainer(
            tiny_bert(), training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[BiasSelectionCallback]
        )


def test_a_callback_added_after_construction_is_refused_before_any_step(tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    trainer = BeftTrainer(model, training_args(tmp_path), train_dataset=TokenDataset())
    trainer.add_callback(BiasSelectionCallback(probe_steps=2))
    with pytest.raises(BeftConfigError, match="added after the trainer was built"):
        trainer.train()
    assert trainer.state.global_step == 0 and _untouched(model, before)


def test_one_callback_for_two_trainers_is_refused(tmp_path):
    selection = BiasSelectionCallback(probe_steps=2)
    first = BeftTrainer(
        tiny_bert(), training_args(tmp_path / "a", max_steps=4), train_dataset=TokenDataset(), callbacks=[selection]
    )
    first.train()
    assert selection.selected is not None
    with pytest.raises(BeftConfigError, match="already belongs to another trainer"):
        BeftTrainer(tiny_bert(), training_args(tmp_path / "b"), train_dataset=TokenDataset(), callbacks=[selection])


def test_resume_true_without_a_checkpoint_is_refused(tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    trainer = BeftTrainer(model, training_args(tmp_path), train_dataset=TokenDataset())
    with pytest.raises(BeftConfigError, match="holds no checkpoint"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0 and _untouched(model, before)


def test_beft_config_of_the_wrong_type_is_refused(tmp_path):
    with pytest.raises(BeftConfigError, match="must be a BeftConfig"):
        BeftTrainer(tiny_bert(), training_args(tmp_path), beft_config={"bias_types": "v"})


class _CausalTokens(torch.utils.data.Dataset):
    """TokenDataset as language modelling: predict every token."""

    def __init__(self):
        self.tokens = TokenDataset()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.tokens[i]
        return {"input_ids": item["input_ids"], "attention_mask": item["attention_mask"], "labels": item["input_ids"]}


def test_logged_learning_rate_is_a_training_groups_without_a_head(tmp_path):
    torch.manual_seed(0)
    config = tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = randomize_biases(tf.OPTForCausalLM(config))
    # k (inert under OPT's absolute positions) is the first group and is frozen at the switch.
    selection = BiasSelectionCallback(probe_steps=3, candidates=("k", "v"))
    trainer = BeftTrainer(
        model,
        training_args(tmp_path, max_steps=6, lr_scheduler_type="constant"),
        train_dataset=_CausalTokens(),
        callbacks=[selection],
    )
    assert list(trainer.parameter_groups) == ["k", "v"]
    trainer.train()
    assert selection.selected == ["v"]
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    # While probing, both candidates train at lr/sqrt(2); then v alone at lr (never frozen k's 0).
    assert rates == pytest.approx([1e-2 / 2**0.5] * 3 + [1e-2] * 3, rel=1e-12)


def test_an_output_dir_with_someone_elses_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    model = tiny_bert()
    trainer = BeftTrainer(model, training_args(tmp_path, max_steps=2), train_dataset=TokenDataset())
    with pytest.raises(BeftConfigError, match=r"already holds files that no beft-trainer run wrote \(notes.txt\)"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_earlier_runs_output_dir_can_be_reused(tmp_path):
    for _ in range(2):
        selection = BiasSelectionCallback(probe_steps=2)
        trainer = BeftTrainer(
            tiny_bert(), training_args(tmp_path, max_steps=3), train_dataset=TokenDataset(), callbacks=[selection]
        )
        trainer.train()
    assert (tmp_path / "beft_selection.json").is_file()


def test_an_optimizer_of_ones_own_is_refused(tmp_path):
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(BeftConfigError, match="builds its own optimizer"):
        BeftTrainer(model, training_args(tmp_path), train_dataset=TokenDataset(), optimizers=(optimizer, None))


def test_a_config_cannot_change_after_its_checks():
    config = SelectionConfig(candidates=("q", "v"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 5
    with pytest.raises(BeftConfigError, match="top_k=2 must be below the number of candidates"):
        dataclasses.replace(config, top_k=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BeftConfig().bias_types = "q,v"


def test_a_copy_with_a_budget_takes_the_budgets_default_score():
    # The unbudgeted default (projection) is not written into the config, so a copy with a budget does not
    # silently carry it: the budget's default is settled when training starts.
    plain = SelectionConfig(candidates=("q", "v", "attn_out"))
    assert plain.score is None and plain.fixed_score == "projection"
    assert plain.shaping_settings()["score"] == "projection"  # what checkpoints always recorded
    budgeted = dataclasses.replace(plain, budget=0.02)
    assert budgeted.score is None and budgeted.fixed_score is None
    assert dataclasses.replace(plain, candidates=("q", "v_scale_in")).fixed_score == "movement"


def test_a_budget_that_holds_every_candidate_is_refused_before_a_step(tmp_path):
    model = tiny_bert()
    before = snapshot(model)
    callback = BiasSelectionCallback(probe_steps=2, candidates=("q", "v", "attn_out"), budget=10**6)
    trainer = BeftTrainer(model, training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[callback])
    with pytest.raises(BeftConfigError, match="which hold every candidate .* nothing is left out"):
        trainer.train()
    assert _untouched(model, before)
    limited = BiasSelectionCallback(probe_steps=2, candidates=("q", "v", "attn_out"), budget=10**6, top_k=1)
    trainer = BeftTrainer(tiny_bert(), training_args(tmp_path), train_dataset=TokenDataset(), callbacks=[limited])
    trainer.train()
    assert len(limited.selected) == 1


def test_bitfit_on_a_model_without_biases_is_refused(tmp_path):
    with pytest.raises(BiasTypeError, match="has no bias to train"):
        BeftTrainer(tiny_model("llama"), training_args(tmp_path), beft_config=BeftConfig(bias_types="all"))


def test_a_head_that_holds_the_backbones_biases_is_refused(tmp_path):
    config = BeftConfig(bias_types=("v",), head_modules=["bert"])
    with pytest.raises(BeftConfigError, match="The head holds .* vectors of the backbone's bias types"):
        BeftTrainer(tiny_bert(), training_args(tmp_path), beft_config=config)


@pytest.mark.parametrize("across_layers", [False, True], ids=["q-and-k", "two-layers"])
def test_a_bias_shared_by_two_modules_is_refused(across_layers, tmp_path):
    model = tiny_bert()
    layers = model.bert.encoder.layer
    if across_layers:
        layers[1].attention.self.value.bias = layers[0].attention.self.value.bias
    else:
        layers[0].attention.self.key.bias = layers[0].attention.self.query.bias
    with pytest.raises(BiasTypeError, match="are one shared tensor"):
        BeftTrainer(model, training_args(tmp_path), callbacks=[BiasSelectionCallback(probe_steps=2)])


def test_a_tied_untyped_bias_is_listed_once():
    model = tf.BertForMaskedLM(tiny_bert().config)  # its decoder bias is the prediction head's bias
    layout = find_biases(model)
    assert layout.other_biases.count("cls.predictions.bias") == 1
    assert "cls.predictions.decoder.bias" not in layout.other_biases


def test_adafactor_with_its_own_step_size_is_refused(tmp_path):
    adafactor = (tf.Adafactor, {"relative_step": True, "lr": None, "warmup_init": False})
    trainer = BeftTrainer(
        tiny_bert(), training_args(tmp_path), train_dataset=TokenDataset(), optimizer_cls_and_kwargs=adafactor
    )
    with pytest.raises(BeftConfigError, match="relative_step=True sets its own step size"):
        trainer.train()


@pytest.mark.parametrize("how", ["load_adapter", "load_mixed_adapters"])
def test_a_model_holding_adapters_is_refused(how, tmp_path):
    trainer = BeftTrainer(tiny_bert(), training_args(tmp_path / "run"), train_dataset=TokenDataset())
    trainer.train()
    trainer.save_model()
    model = tiny_bert()
    if how == "load_adapter":
        load_adapter(model, tmp_path / "run")
    else:
        load_mixed_adapters(model, {"v": tmp_path / "run"})
    with pytest.raises(BeftConfigError, match="The model holds beft adapters"):
        BeftTrainer(model, training_args(tmp_path / "again"), train_dataset=TokenDataset())
