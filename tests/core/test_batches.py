import collections
import dataclasses
import subprocess
import sys
from collections.abc import Mapping
from typing import NamedTuple

import pytest
import torch

from lightning_nan.core.batches import BatchSplitError, batch_size, fingerprint, fingerprints, select

POS = [4, 0, 2, 2]  # out of order, with a repeat


class Pair(NamedTuple):
    x: torch.Tensor
    label: str


@dataclasses.dataclass
class Sample:
    x: torch.Tensor
    names: list
    scale: float = 1.0
    doubled: torch.Tensor = dataclasses.field(init=False)

    def __post_init__(self):
        self.doubled = self.x * 2


@dataclasses.dataclass(frozen=True)
class Frozen:
    x: torch.Tensor
    tag: str


class ReadOnlyMap(Mapping):
    """A Mapping that is not a dict, built from a dict."""

    def __init__(self, data):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


class Unbuildable(ReadOnlyMap):
    def __init__(self, data, secret):
        super().__init__(data)


class Opaque:  # a class this module cannot look into
    def __init__(self, t):
        self.t = t


def _x(n=5, d=3, dtype=torch.float32, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_tensor_select_equals_indexing_and_keeps_dtype(dtype):
    x = _x(dtype=dtype)
    out = select(x, POS)
    assert out.dtype == dtype and out.device == x.device
    assert torch.equal(out, x[torch.tensor(POS)])
    assert batch_size(x) == 5


def test_select_keeps_the_device_without_reading_data():
    x = torch.empty(6, 2, device="meta")  # meta tensors have no data: any host copy would fail
    out = select({"x": x, "names": list("abcdef")}, [5, 1])
    assert out["x"].device.type == "meta" and out["x"].shape == (2, 2) and out["names"] == ["f", "b"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_select_on_cuda_stays_on_cuda_and_fingerprints_match_cpu():
    x = _x().cuda()
    out = select(x, POS)
    assert out.device == x.device and torch.equal(out.cpu(), x.cpu()[POS])
    assert fingerprints(x) == fingerprints(x.cpu())


def test_nested_mix_round_trips():
    x, y = _x(seed=1), torch.arange(5)
    table, scalar = torch.randn(7, 2), torch.tensor(3.0)
    batch = {
        "x": x,
        "meta": {"names": ["a", "b", "c", "d", "e"], "ids": ("i0", "i1", "i2", "i3", "i4"), "split": "train"},
        "pair": (y, "tag", None, 7),
        "table": table,  # first dim 7 != 5: shared, carried along
        "scalar": scalar,
        "list_of_tensors": [x[:, 0], y.float()],  # holds tensors: walked into, not a per-sample list
        "opaque": Opaque(x),
    }
    out = select(batch, POS)
    assert list(out) == list(batch)
    assert torch.equal(out["x"], x[POS])
    assert out["meta"]["names"] == ["e", "a", "c", "c"]
    assert out["meta"]["ids"] == ("i4", "i0", "i2", "i2")
    assert out["meta"]["split"] == "train"
    assert isinstance(out["pair"], tuple) and torch.equal(out["pair"][0], y[POS])
    assert out["pair"][1:] == ("tag", None, 7)
    assert out["table"] is table and out["scalar"] is scalar and out["opaque"] is batch["opaque"]
    assert torch.equal(out["list_of_tensors"][0], x[POS, 0]) and torch.equal(out["list_of_tensors"][1], y[POS].float())
    assert torch.equal(batch["x"], x) and batch["meta"]["names"] == ["a", "b", "c", "d", "e"]  # input untouched


def test_namedtuple_keeps_its_type():
    x = _x()
    out = select([Pair(x, "shared")], [1, 3])
    assert isinstance(out, list) and type(out[0]) is Pair
    assert torch.equal(out[0].x, x[[1, 3]]) and out[0].label == "shared"


def test_dataclass_is_rebuilt_including_init_false_fields():
    x = _x()
    batch = Sample(x, list("abcde"), scale=0.5)
    out = select(batch, POS)
    assert type(out) is Sample and out.scale == 0.5 and out.names == ["e", "a", "c", "c"]
    assert torch.equal(out.x, x[POS]) and torch.equal(out.doubled, (x * 2)[POS])
    frozen = select(Frozen(x, "t"), [0])
    assert type(frozen) is Frozen and torch.equal(frozen.x, x[:1]) and frozen.tag == "t"


def test_mapping_types_are_kept():
    x = _x()
    ordered = collections.OrderedDict(b=x, a=list("vwxyz"))
    out = select(ordered, [2])
    assert type(out) is collections.OrderedDict and list(out) == ["b", "a"] and out["a"] == ["x"]
    dd = collections.defaultdict(list, x=x)
    out = select(dd, [0, 1])
    assert type(out) is collections.defaultdict and out.default_factory is list and torch.equal(out["x"], x[:2])
    ud = collections.UserDict(x=x)
    out = select(ud, [4])
    assert type(out) is collections.UserDict and torch.equal(out["x"], x[4:]) and torch.equal(ud["x"], x)
    ro = select(ReadOnlyMap({"x": x, "k": 1}), [3])
    assert type(ro) is ReadOnlyMap and torch.equal(ro["x"], x[3:4]) and ro["k"] == 1


def test_list_of_strings_is_selected_and_a_batch_without_tensors_needs_size():
    names = ["a", "b", "c"]
    assert select({"names": names}, [2, 0], size=3) == {"names": ["c", "a"]}
    with pytest.raises(BatchSplitError, match="no tensor with a batch dimension"):
        batch_size({"names": names})


def test_batch_size_is_first_dim_of_first_tensor_depth_first():
    assert batch_size({"s": torch.tensor(1.0), "a": [None, {"t": torch.zeros(4, 9)}], "b": torch.zeros(2)}) == 4
    assert batch_size(Sample(torch.zeros(3, 1), ["a", "b", "c"])) == 3


def test_unknown_top_level_type_names_the_type_and_the_fix():
    with pytest.raises(BatchSplitError, match=r"type test_batches\.Opaque.*`splitter=`"):
        select(Opaque(_x()), [0])
    with pytest.raises(TypeError, match="Opaque"):  # BatchSplitError is a TypeError
        batch_size(Opaque(_x()))


def test_no_tensor_found_names_the_opaque_object_inside():
    with pytest.raises(BatchSplitError, match=r"type tuple: no tensor.*holds a test_batches\.Opaque.*`splitter=`"):
        batch_size((Opaque(_x()), "x"))


def test_unbuildable_mapping_names_its_path():
    with pytest.raises(BatchSplitError, match=r"Unbuildable at \['inner'\].*`splitter=`"):
        select({"inner": Unbuildable({"x": _x()}, secret=1)}, [0])


@pytest.mark.parametrize("bad", [5, -1, 100])
def test_position_out_of_range(bad):
    with pytest.raises(IndexError, match=f"Position {bad} is out of range for a batch of 5 samples"):
        select(_x(), [0, bad])
    with pytest.raises(IndexError, match=f"Position {bad}"):
        fingerprint(_x(), bad)


def test_size_is_validated():
    with pytest.raises(ValueError, match="Expected `size`"):
        select(_x(), [0], size=-2)


def _batch(rows, names):
    return {"x": torch.stack(rows), "name": list(names), "lut": torch.arange(7.0), "epoch": 4}


def test_fingerprint_depends_on_content_only():
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])
    one = _batch([a, b, c], "pqr")
    two = _batch([c, a], "rp")  # same samples at other positions, in a batch of another size
    assert fingerprint(one, 0) == fingerprint(two, 1)
    assert fingerprint(one, 2) == fingerprint(two, 0)
    fps = fingerprints(one)
    assert len(set(fps)) == 3 and all(len(f) == 16 and int(f, 16) >= 0 for f in fps)
    assert fps == [fingerprint(one, i) for i in range(3)]
    assert fingerprint(_batch([a, b], "pq"), 0) != fingerprint(_batch([a, b], "zq"), 0)  # another name
    assert fingerprint(_batch([a, b], "pq"), 0) != fingerprint(_batch([a + 1e-6, b], "pq"), 0)  # another value
    assert fingerprint(a[None], 0) != fingerprint(a[None].double(), 0)  # same values, another dtype
    assert fingerprint(a.reshape(1, 2, 1), 0) != fingerprint(a.reshape(1, 1, 2), 0)  # another shape


def test_fingerprint_of_selected_sample_equals_original():
    batch = {"x": _x(dtype=torch.bfloat16), "m": torch.ones(5, 0), "ok": torch.rand(5) > 0.5, "n": list("abcde")}
    sub = select(batch, POS)
    assert [fingerprint(sub, i) for i in range(4)] == [fingerprint(batch, p) for p in POS]


def test_fingerprint_is_stable_across_processes():
    code = (
        "import torch; from lightning_nan.core.batches import fingerprints;"
        "print(fingerprints({'x': torch.arange(6.0).reshape(3, 2), 'n': ['a', 'b', 'c']}))"
    )
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    ours = fingerprints({"x": torch.arange(6.0).reshape(3, 2), "n": ["a", "b", "c"]})
    assert theirs == str(ours)


def test_one_fingerprint_alone_in_a_collated_batch_in_a_custom_split_and_in_the_batch_key():
    from torch.utils.data import default_collate

    from lightning_nan.core.culprits import find_culprits
    from lightning_nan.core.quarantine import sample_fingerprint
    from lightning_nan.core.recurrence import batch_key

    samples = [{"x": torch.tensor([float(i), 1.0]), "label": i, "w": 0.5 * i, "ok": i % 2 == 0, "name": f"s{i}"} for i in range(6)]
    samples[4]["x"][1] = float("nan")
    batch = default_collate(samples)
    assert fingerprints(batch) == [sample_fingerprint(s) for s in samples]
    # a custom splitter's one-sample batches name the culprit by the same fingerprint as the built-in splitter
    model = torch.nn.Linear(2, 1)
    loss = lambda b: model(b["x"]).sum()  # noqa: E731
    split = lambda b, pos: select(b, pos)  # noqa: E731
    for kwargs in ({}, {"splitter": split, "sizer": batch_size}):
        report = find_culprits(loss, batch, module=model, **kwargs)
        assert report.positions == [4] and report.fingerprints == [sample_fingerprint(samples[4])]
    # the batch key is made of the samples' fingerprints: the same samples, the same key; another sample, another key
    assert batch_key([(0, batch)]) == batch_key([(7, default_collate(samples))])
    assert batch_key([(0, batch)]) != batch_key([(0, default_collate(samples[:5] + samples[:1]))])
