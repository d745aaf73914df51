"""Steps whose loss or gradients are not finite (injected here by poisoning the gradients of chosen
steps) change no weight, are counted and logged; enough in a row reload the last checkpoint; past
the budget the run stops with a one-line report."""

from __future__ import annotations

import pytest
import torch

from scifm.train import trainer as trainer_module
from scifm.train.export import load_checkpoint_model
from scifm.train.trainer import TrainingDiverged, train
from tests.helpers.run_metrics import records

COMMON = ("trainer.max_steps=5", "trainer.ckpt_every=1", "trainer.log_every=1", "trainer.val_every=100",
          "trainer.batch_size=4", "data.seq_len=128", "data.val_batches=1")


@pytest.fixture
def poison(monkeypatch):
    """poison({2, 3}): the gradients and loss of those steps (1-based) become NaN; with
    corrupt_weights the weights drift too (+1), as a state that went bad would."""

    def install(bad_steps: set[int], corrupt_weights: bool = False) -> None:
        real, calls = trainer_module.train_step, [0]

        def train_step(runner, micro, ctx, grad_clip):
            loss, norm = real(runner, micro, ctx, grad_clip)
            calls[0] += 1
            if calls[0] not in bad_steps:
                return loss, norm
            for p in runner.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                if corrupt_weights:
                    p.data.add_(1.0)
            return float("nan"), float("nan")

        monkeypatch.setattr(trainer_module, "train_step", train_step)

    return install


def weights(ckpt) -> dict[str, torch.Tensor]:
    return load_checkpoint_model(ckpt)[0].state_dict()


def test_a_nonfinite_step_changes_nothing_and_is_counted(make_config, tmp_path, poison):
    poison({2})
    summary = train(make_config(*COMMON), tmp_path)
    assert summary["nonfinite_steps"] == [2] and summary["nonfinite_reloads"] == 0
    before, after = weights(tmp_path / "checkpoints/step_1"), weights(tmp_path / "checkpoints/step_2")
    assert all(torch.equal(before[k], after[k]) for k in before)  # expert biases included
    logged = records(tmp_path)
    assert logged[2].get("update_skipped") and not logged[3].get("update_skipped")
    assert torch.isfinite(torch.tensor(logged[5]["loss"]))


def test_nonfinite_steps_in_a_row_reload_the_last_checkpoint(make_config, tmp_path, poison, capsys):
    poison({3, 4}, corrupt_weights=True)
    summary = train(make_config(*COMMON, "trainer.ckpt_every=2", "trainer.nonfinite_reload_after=2"), tmp_path)
    assert summary["nonfinite_steps"] == [3, 4] and summary["nonfinite_reloads"] == 1
    assert "reloaded the weights, optimizer and schedule of" in capsys.readouterr().out
    # steps 3 and 4 left the weights drifted by +2; the reload after step 4 brought back step 2's
    before, after = weights(tmp_path / "checkpoints/step_2"), weights(tmp_path / "checkpoints/step_4")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_past_the_budget_the_run_stops_with_a_one_line_report(make_config, tmp_path, poison):
    poison({2, 3, 4})
    with pytest.raises(TrainingDiverged) as err:
        train(make_config(*COMMON, "trainer.max_nonfinite_steps=2", "trainer.nonfinite_reload_after=0"), tmp_path)
    message = str(err.value)
    assert "\n" not in message and "at steps [2, 3, 4]" in message and "step_3" in message
