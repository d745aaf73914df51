"""The trainer freezes its set-up's objects out of the cycle collector's walks (core/python_gc.py):
the data path on the training thread would otherwise start full passes over all of them."""

from __future__ import annotations

import gc


def test_the_trainer_freezes_what_its_set_up_made(make_config, tmp_path):
    from scifm.train.trainer import train

    gc.unfreeze()  # an earlier training in this process froze its own
    tracked_before = len(gc.get_objects())
    train(make_config("trainer.max_steps=1", "trainer.val_every=100", "data.val_batches=1", "trainer.batch_size=2",
                      "data.seq_len=64"), tmp_path / "run")
    # what was tracked when training began (less what the collection before the freeze freed) and what
    # its set-up added (the model, the tokenizer, the loaders); none, unfrozen
    assert gc.get_freeze_count() > tracked_before // 2, (gc.get_freeze_count(), tracked_before)
