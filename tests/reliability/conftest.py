"""The run every fault is compared with: three epochs, uninterrupted, in a writable folder."""

from __future__ import annotations

import pytest
from reliability_common import Model, guard_of, loader, trainer


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The model after 3 epochs of :func:`reliability_common.trainer`; epoch 0 quarantines samples 5 and 30."""
    model = Model()
    t = trainer(tmp_path_factory.mktemp("whole"), max_epochs=3)
    t.fit(model, loader())
    assert [i.samples for i in guard_of(t).incidents] == [[5], [30]]
    return model
