"""mclip.train.distiller: what trains in stage 2 (student, temperature, layer-kd projections), its optimizer groups and
the learning rate of each step."""

import dataclasses

import numpy as np
import pytest
import torch

from mclip.config import MIN_TEMPERATURE, TrainConfig
from mclip.errors import ConfigError
from mclip.models.student import build_student
from mclip.train import losses
from mclip.train.distiller import Distiller, lr_at, param_groups


def test_lr_schedule_warms_up_then_decays():
    config = TrainConfig(data="d", cache="c", out="o", lr=1.0, warmup_steps=10, schedule="linear")
    assert lr_at(0, config, 110) == pytest.approx(0.1)
    assert lr_at(9, config, 110) == pytest.approx(1.0)
    assert lr_at(60, config, 110) == pytest.approx(0.5)
    assert lr_at(110, config, 110) == pytest.approx(0.0)
    cosine = dataclasses.replace(config, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(60, cosine, 110) == pytest.approx(0.55)
    assert lr_at(110, cosine, 110) == pytest.approx(0.1)
    assert lr_at(500, dataclasses.replace(config, schedule="constant"), 110) == 1.0


def test_layer_kd_shapes(bert_student):
    student = build_student(str(bert_student), dim=24)
    model = Distiller(student, 0.05, True, student_layers=(1, 2), teacher_width=24)
    enc = student.tokenize(["goldmedaille", "金牌 and more"])
    emb, states, temperature = model(enc["input_ids"], enc["attention_mask"])
    assert emb.shape == (2, 24) and [s.shape for s in states] == [(2, 24), (2, 24)] and temperature.shape == ()
    assert Distiller(student, 0.05, False).log_temperature.requires_grad is False


def test_a_learnt_temperature_pushed_below_the_floor_comes_back(bert_student):
    model = Distiller(_tiny_student(bert_student), 0.05, learn_temperature=True)
    with torch.no_grad():
        model.log_temperature.fill_(np.log(MIN_TEMPERATURE) - 0.5)  # where momentum can carry it
    model.clamp_temperature_()
    assert model.temperature().item() == pytest.approx(MIN_TEMPERATURE, rel=1e-6)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    losses.info_nce(s, t, torch.arange(4), torch.eye(4, dtype=torch.bool), model.temperature())["infonce"].backward()
    assert model.log_temperature.grad.abs() > 0  # at the floor it still has a gradient, so it can move back up
    fixed = Distiller(_tiny_student(bert_student), 0.001, learn_temperature=False)
    fixed.clamp_temperature_()
    assert fixed.temperature().item() == pytest.approx(0.001)  # a fixed temperature is the user's, floor or not
    with pytest.raises(ConfigError, match="below the floor 0.01 of a learnt temperature"):
        TrainConfig(data="d", cache="c", out="o", loss="cl", temperature=0.005)


def _tiny_student(folder):
    return build_student(str(folder), 8, projection_init="random")


def test_param_groups_decay_matrices_only_and_give_the_embedding_its_own_lr(bert_student):
    model = Distiller(build_student(str(bert_student), dim=24), 0.05, True, student_layers=(1,), teacher_width=24)
    model.student.backbone.embeddings.position_embeddings.weight.requires_grad_(False)  # frozen: in no group
    groups = param_groups(model, 0.1, embedding_lr_scale=5.0)
    name = {id(p): n for n, p in model.named_parameters()}
    decay, embedding, flat = ([name[id(p)] for p in g["params"]] for g in groups)
    assert sorted(decay + embedding + flat) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0] and groups[1]["lr_scale"] == 5.0
    assert embedding == ["student.backbone.embeddings.word_embeddings.weight"]
    assert "layer_proj.0.weight" in decay and all(model.get_parameter(n).ndim == 2 for n in decay)
    assert "log_temperature" in flat and "layer_proj.0.bias" in flat and any("LayerNorm" in n for n in flat)
    assert all(n == "log_temperature" or n.endswith((".bias", "LayerNorm.weight")) for n in flat)
    model.student.backbone.get_input_embeddings().weight.requires_grad_(False)  # an empty group is left out
    assert [g["weight_decay"] for g in param_groups(model, 0.1)] == [0.1, 0.0]
