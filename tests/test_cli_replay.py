"""``lightning-nan replay`` of a dump whose model class lives in the training script (issue 16)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import lightning_nan as ln
from lightning_nan.cli import main

# The usual layout: the model class is defined in the script that trains it (its module is __main__).
SCRIPT = """
import torch, pytorch_lightning as pl

class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x / x.norm(dim=1, keepdim=True)  # 0/0 for an all-zero sample
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
"""



def fit_with_dumps(tmp_path, model, data, batch_size):
    """One epoch under NaNGuard and BatchBisection(dump_dir=...): the guard and the warnings raised."""
    guard = ln.NaNGuard()
    trainer = pl.Trainer(
        callbacks=[guard, ln.BatchBisection(dump_dir=tmp_path / "dumps")], max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=batch_size))
    return guard, caught


def test_a_model_class_of_the_training_script_replays_elsewhere(tmp_path, monkeypatch, capsys):
    """``python train.py`` pickles the model as ``__main__.MLP``, which no other process can import (the
    replay used to end in ``Can't get attribute 'MLP' on <module '__main__'>``): the exported program replays it."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    namespace = {"__name__": "__main__"}
    exec(compile(SCRIPT, str(script), "exec"), namespace)  # as `python train.py` runs it
    monkeypatch.setattr(sys.modules["__main__"], "MLP", namespace["MLP"], raising=False)
    x, y = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.randn(32, 1)
    x[13] = 0.0
    guard, caught = fit_with_dumps(tmp_path, namespace["MLP"](), torch.utils.data.TensorDataset(x, y), batch_size=8)
    assert not [w for w in caught if "cannot be replayed" in str(w.message)]  # exported: nothing to warn about
    dump = guard.incidents[0].detail["dump"]
    capsys.readouterr()
    assert main(["replay", dump]) == 0  # in the training process, with the model's own code
    own = capsys.readouterr().out.splitlines()
    monkeypatch.undo()  # another process: no MLP in its __main__, started in another folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    assert main(["replay", dump]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == own[0] == f"{dump}: step 1, non-finite loss; data set indices [13]"
    assert own[1] == "reproduced: yes, with the model's code (MLP from __main__)"
    assert lines[1] == "reproduced: yes, with the exported program (no source code needed)"
    # the same localization as the model's own code: the division in training_step, line 12 of train.py, 0/0
    assert lines[2] == own[2] == (
        f"localization: first non-finite value from div at {script}:12 in training_step (inputs finite: min 0, max 0 — 0/0?), "
        "4 non-finite elements, outside every module, then reaching net (Sequential) as input"
    )


def test_a_dump_that_cannot_be_replayed_elsewhere_warns_when_written(tmp_path, capsys):
    class Opaque(pl.LightningModule):  # a class defined in a function, whose loss torch.export cannot trace
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            return loss * 2 if float(loss.detach().nan_to_num()) > 1e9 else loss  # data-dependent Python branch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.ones(8, 2)
    x[5, 0] = float("nan")
    guard, caught = fit_with_dumps(tmp_path, Opaque(), torch.utils.data.TensorDataset(x), batch_size=4)
    (warning,) = [w for w in caught if "cannot be replayed" in str(w.message)]
    message = str(warning.message)
    assert "nan_dump_step1_rank0.pt cannot be replayed without your source code: torch.export could not" in message
    assert "the model could not be pickled" in message and "Define the model's classes in a module of their own" in message
    # and replay says why, rc 2, no traceback
    assert main(["replay", guard.incidents[0].detail["dump"]]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded here" in err and "holds no exported program" in err and "Traceback" not in err


@pytest.mark.parametrize("exported", [False, True])
def test_an_importable_model_replays_with_its_code_or_the_exported_program(tmp_path, capsys, exported):
    from lightning_nan.core.dump import write_dump

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())  # forward returns the loss's terms
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # 1e30 * 1e10 overflows float32
    path = tmp_path / "dump.pt"
    write_dump(path, module=model, batch=torch.tensor([[1.0, -1.0], [1e10, 1e10]]), batch_idx=0)
    assert main(["replay", str(path), "--json"] + (["--exported"] if exported else [])) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reproduced"] is True
    assert result["replayed_with"].startswith("the exported program" if exported else "the model's code (Sequential")
    assert result["localization"]["module"] == "0" and result["localization"]["module_type"] == "Linear"


def test_the_readme_replay_of_the_dirty_data_example(tmp_path, capsys, monkeypatch):
    """README: ``python examples/dirty_data.py`` writes a dump of its first failure; ``lightning-nan replay`` on it
    (here without the example's code, as from another folder) reproduces the 0/0 of the all-zero image."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    import dirty_data

    result = dirty_data.train(True, str(tmp_path), epochs=1, workers=0, dump_dir=str(tmp_path / "dumps"))
    first = result.guard.incidents[0]
    # the all-zero image triggers the model's 0/0: named (not quarantined), and the dump reproduces it
    assert first.triggers == [1777] and first.detail["dump"].endswith("nan_dump_step26_rank0.pt")
    capsys.readouterr()
    assert main(["replay", first.detail["dump"], "--exported"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("nan_dump_step26_rank0.pt: step 26, non-finite loss; data set indices [1777]")
    assert lines[1] == "reproduced: yes, with the exported program (no source code needed)"
    assert lines[2].startswith("localization: first non-finite value from div at ") and "dirty_data.py:95 in forward" in lines[2]
    assert lines[2].endswith("(inputs finite: min 0, max 0 — 0/0?), 64 non-finite elements, inside <root> (Net)")


def test_the_models_own_code_is_found_from_any_folder(tmp_path, capsys, monkeypatch):
    """A model class in a module of the project: replay imports it from the folder its source was in, wherever it runs."""
    from lightning_nan.core.dump import write_dump

    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text("")
    (project / "models" / "net.py").write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n    def forward(self, x):\n        return torch.log(x).sum()\n"
    )
    with monkeypatch.context() as m:
        m.syspath_prepend(str(project))
        from models.net import Net

        write_dump(tmp_path / "dump.pt", module=Net(), batch=torch.tensor([1.0, -1.0]), batch_idx=0)
    for name in ("models.net", "models"):
        sys.modules.pop(name, None)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["replay", str(tmp_path / "dump.pt")]) == 0
    out = capsys.readouterr().out
    assert "reproduced: yes, with the model's code (Net from models.net)" in out and "log(<0)?" in out
    assert str(project) not in sys.path  # not left behind
    for name in ("models.net", "models"):
        sys.modules.pop(name, None)
