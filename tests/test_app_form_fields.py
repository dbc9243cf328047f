"""The config form shows only the fields that apply: LoRA's with an adapter method, QLoRA's bits with
qlora, a method with a pretrained start. Hidden fields keep what was typed, focus skips them, and the
config the form produces carries their defaults, so what does not apply is never refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from app_testkit import form_app, screen_text, wait_for
from textual.widgets import Input, Select

from app.screens.config_form import LORA_FIELDS, ConfigFormScreen
from engine.config import ModelConfig, RunConfig
from engine.errors import UserError
from engine.paths import Layout

SIZE = (100, 50)
LORA_IDS = [spec.id for spec in LORA_FIELDS if spec.name != "quant_bits"]


def shown(form: ConfigFormScreen, field_id: str) -> bool:
    return bool(form.query_one(f"#row-{field_id}").display)


def shown_lora(form: ConfigFormScreen) -> list[str]:
    return [field_id for field_id in (*LORA_IDS, "f-model-quant_bits") if shown(form, field_id)]


def focus_order(form: ConfigFormScreen) -> list[str]:
    """The ids Tab visits, in order (Textual's focus chain, which Tab follows)."""
    return [str(widget.id) for widget in form.focus_chain]


async def open_form(pilot: Any) -> ConfigFormScreen:
    await wait_for(pilot, lambda: isinstance(pilot.app.screen, ConfigFormScreen), 10, "the config form")
    await pilot.pause()
    return pilot.app.screen


async def test_lora_fields_show_only_for_an_adapter_and_reach_the_config(tmp_path: Path) -> None:
    draft = RunConfig(name="ft", model=ModelConfig(init_from="org/model"))
    async with form_app(Layout(tmp_path), draft).run_test(size=SIZE) as pilot:
        form = await open_form(pilot)
        assert shown(form, "f-model-method") and form.query_one("#f-model-method", Select).value == "full"
        assert shown_lora(form) == []
        assert "LoRA rank" not in screen_text(pilot.app) and "QLoRA bits" not in screen_text(pilot.app)
        assert not set(LORA_IDS) & set(focus_order(form))
        form.query_one("#f-model-method", Select).focus()
        await pilot.press("tab")  # past the hidden LoRA fields and preset
        assert pilot.app.focused is form.query_one("#f-train-micro_batch")
        cfg = form.collect()
        assert (cfg.model.init_from, cfg.model.method, cfg.model.lora_rank) == ("org/model", "full", 16)

        form.query_one("#f-model-method", Select).focus()
        await pilot.press("enter", "down", "enter")  # the open list: full, then LoRA adapter
        await wait_for(pilot, lambda: shown_lora(form) == LORA_IDS, 5, "the LoRA fields")
        assert "LoRA rank" in screen_text(pilot.app) and "QLoRA bits" not in screen_text(pilot.app)
        assert set(LORA_IDS) <= set(focus_order(form))
        form.query_one("#f-model-lora_rank", Input).value = "8"
        form.query_one("#f-model-lora_targets", Input).value = "q_proj,v_proj"
        cfg = form.collect()
        assert (cfg.model.method, cfg.model.lora_rank, cfg.model.lora_targets) == ("lora", 8, "q_proj,v_proj")

        form.query_one("#f-model-method", Select).value = "qlora"
        await wait_for(pilot, lambda: shown(form, "f-model-quant_bits"), 5, "the QLoRA bits")
        form.query_one("#f-model-quant_bits", Input).value = "8"
        cfg = form.collect()
        assert (cfg.model.method, cfg.model.lora_rank, cfg.model.quant_bits) == ("qlora", 8, 8)


async def test_hidden_fields_keep_their_values_and_are_not_refused(tmp_path: Path) -> None:
    """A rank of 0 typed for LoRA would be refused; under a full fine-tune it does not apply, so the
    form saves the default instead, and going back to LoRA shows (and refuses) the 0 again."""
    draft = RunConfig(name="ft", model=ModelConfig(init_from="org/model", method="lora"))
    async with form_app(Layout(tmp_path), draft).run_test(size=SIZE) as pilot:
        form = await open_form(pilot)
        assert shown_lora(form) == LORA_IDS
        form.query_one("#f-model-lora_rank", Input).value = "0"
        with pytest.raises(UserError, match="model.lora_rank must be a positive integer, got 0"):
            form.collect()
        form.query_one("#f-model-method", Select).value = "full"
        await wait_for(pilot, lambda: shown_lora(form) == [], 5, "the LoRA fields to go")
        cfg = form.collect()
        assert (cfg.model.method, cfg.model.lora_rank) == ("full", ModelConfig.lora_rank)
        form.query_one("#f-model-method", Select).value = "lora"
        await wait_for(pilot, lambda: shown_lora(form) == LORA_IDS, 5, "the LoRA fields")
        assert form.query_one("#f-model-lora_rank", Input).value == "0"
        with pytest.raises(UserError, match="model.lora_rank"):
            form.collect()


async def test_a_model_from_scratch_has_no_method_until_a_pretrained_start(tmp_path: Path) -> None:
    """The engine refuses a method without init_from, so a start from scratch hides Method with the
    model name and LoRA's fields, and shows the preset; a pretrained start swaps them."""
    draft = RunConfig(name="m", model=ModelConfig(method="lora"))  # a draft's method stays in the hidden select
    async with form_app(Layout(tmp_path), draft).run_test(size=SIZE) as pilot:
        form = await open_form(pilot)
        hidden_from_scratch = ["f-model-init_from", "f-model-method", *LORA_IDS]
        assert not any(shown(form, field_id) for field_id in hidden_from_scratch)
        assert shown(form, "f-model-preset") and shown(form, "f-data-tokenizer")
        assert "Method" not in screen_text(pilot.app) and "Model preset" in screen_text(pilot.app)
        assert not set(hidden_from_scratch) & set(focus_order(form))
        cfg = form.collect()
        assert (cfg.model.init_from, cfg.model.method) == (None, "full")

        form.query_one("#start-kind", Select).value = "pretrained"
        await wait_for(pilot, lambda: shown(form, "f-model-method"), 5, "the method")
        assert all(shown(form, field_id) for field_id in hidden_from_scratch)
        assert not shown(form, "f-model-preset") and not shown(form, "f-data-tokenizer")
        form.query_one("#f-model-init_from", Input).value = "org/model"
        cfg = form.collect()
        assert (cfg.model.init_from, cfg.model.method, cfg.data.tokenizer) == ("org/model", "lora", "org/model")


async def test_source_fields_follow_the_source_kind(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a line of text\n")
    async with form_app(Layout(tmp_path), RunConfig(name="m")).run_test(size=SIZE) as pilot:
        form = await open_form(pilot)
        assert pilot.app.focused is form.query_one("#f-data-max_docs")  # the first field shown
        assert [shown(form, i) for i in ("f-data-source", "f-data-subset", "f-data-split")] == [False, False, False]
        form.query_one("#source-kind", Select).value = "local"
        await wait_for(pilot, lambda: shown(form, "f-data-source"), 5, "the path")
        assert not shown(form, "f-data-subset")
        form.query_one("#f-data-source", Input).value = str(corpus)
        assert form.collect().data.source == str(corpus.resolve())
        form.query_one("#source-kind", Select).value = "hub"
        await wait_for(pilot, lambda: shown(form, "f-data-subset") and shown(form, "f-data-split"), 5, "the hub fields")
        form.query_one("#f-data-source", Input).value = "org/data"
        form.query_one("#f-data-subset", Input).value = "en"
        cfg = form.collect()
        assert (cfg.data.source, cfg.data.subset, cfg.data.split) == ("org/data", "en", "train")
        form.query_one("#source-kind", Select).value = "stdlib"
        await wait_for(pilot, lambda: not shown(form, "f-data-source"), 5, "the path to go")
        cfg = form.collect()
        assert (cfg.data.source, cfg.data.subset) == ("stdlib", None)
