"""Calibration data for SNIP and GraSP: the accepted forms (dicts of tensors, tuples with a loss_fn, a
DataLoader), only the batches asked for are read, and a batch of the wrong form is named in the error."""

import pytest
import torch
from hf_support import one_thread, tiny_bert_classifier  # noqa: F401
from torch.utils.data import DataLoader, Dataset

import sparseadapter as sa

transformers = pytest.importorskip("transformers")
CFG = dict(kind="houlsby", bottleneck=4, sparsity=0.5, scope="layer")


def make_model():
    return tiny_bert_classifier()


def dict_batches(n=4):
    gen = torch.Generator().manual_seed(1)
    return [
        dict(input_ids=torch.randint(0, 40, (4, 9), generator=gen), labels=torch.randint(0, 3, (4,), generator=gen))
        for _ in range(n)
    ]


class Strict:
    """An iterator of batches that fails the test if more than `allowed` are taken."""

    def __init__(self, batches, allowed):
        self.batches, self.allowed, self.taken = list(batches), allowed, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.taken >= self.allowed:
            raise AssertionError(f"calibration data read beyond the {self.allowed} batches needed")
        self.taken += 1
        return self.batches[self.taken - 1]


@pytest.mark.parametrize("pruner", ["snip", "grasp"])
def test_only_the_batches_asked_for_are_read(pruner):
    data = Strict(dict_batches(4), allowed=2)
    model = sa.add_adapter(
        make_model(), "a", sa.SparseAdapterConfig(pruner=pruner, **CFG), data=data, calibration_batches=2
    )
    assert data.taken == 2
    assert sa.pruning_record(model, "a").calibration_examples == 8
    # the same two batches as a list: the same pattern
    twin = sa.add_adapter(make_model(), "a", sa.SparseAdapterConfig(pruner=pruner, **CFG), data=dict_batches(2))
    for (n, m), (_, t) in zip(model.named_modules(), twin.named_modules()):
        if isinstance(m, sa.SparseLinear):
            assert torch.equal(m.col_indices, t.col_indices), n


@pytest.mark.parametrize("pruner", ["random", "magnitude", "synflow"])
def test_data_free_pruners_do_not_touch_the_data(pruner):
    data = Strict(dict_batches(2), allowed=0)
    model = sa.add_adapter(make_model(), "a", sa.SparseAdapterConfig(pruner=pruner, **CFG), data=data)
    assert data.taken == 0 and sa.pruning_record(model, "a").calibration_examples == 0


class Examples(Dataset):
    def __init__(self):
        self.rows = [
            dict(input_ids=b["input_ids"][i], labels=b["labels"][i]) for b in dict_batches(4) for i in range(4)
        ]
        self.reads = 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.reads += 1
        return self.rows[i]


def test_a_dataloader_is_read_only_as_far_as_needed():
    examples = Examples()
    loader = DataLoader(examples, batch_size=4)  # default collate: a dict of stacked tensors
    model = sa.add_adapter(
        make_model(), "a", sa.SparseAdapterConfig(pruner="snip", **CFG), data=loader, calibration_batches=1
    )
    assert examples.reads == 4 and sa.pruning_record(model, "a").calibration_examples == 4


def test_tuples_work_with_a_loss_fn():
    data = [(b["input_ids"], b["labels"]) for b in dict_batches(2)]
    model = sa.add_adapter(
        make_model(),
        "a",
        sa.SparseAdapterConfig(pruner="snip", **CFG),
        data=data,
        loss_fn=lambda m, batch: m(input_ids=batch[0], labels=batch[1]).loss,
    )
    assert sa.pruning_record(model, "a").calibration_examples == 8


@pytest.mark.parametrize(
    "data,kwargs,needles",
    [
        (
            [(torch.zeros(4, 9, dtype=torch.long), torch.zeros(4, dtype=torch.long))],
            {},
            ["batch 0 is a tuple of 2 (Tensor[4, 9] int64, Tensor[4] int64)", "loss_fn"],
        ),
        ([dict(input_ids=[[1, 2, 3]], labels=[0])], {}, ["'input_ids' is a list", "collate"]),
        ([dict(text=["a film"], labels=torch.tensor([0]))], {}, ["'text' is a list"]),
        (dict(input_ids=torch.zeros(4, 9, dtype=torch.long)), {}, ["a single batch", "data=[batch]"]),
        ([dict(input_ids=torch.zeros(4, 9, dtype=torch.long))], {}, ["returned no loss", "'input_ids'", "labels"]),
        (
            [dict(input_ids=torch.zeros(4, 9, dtype=torch.long), labels=torch.zeros(4, dtype=torch.long))],
            dict(loss_fn=lambda m, batch: m(batch["ids"]).loss),
            ["KeyError", "keys ['input_ids', 'labels']"],
        ),
        (
            [[torch.zeros(4, 9, dtype=torch.long)]],
            dict(loss_fn=lambda m, batch: m(input_ids=batch.input_ids).loss),
            ["AttributeError", "a list of 1 (Tensor[4, 9] int64)"],
        ),
        (42, {}, ["a int", "not iterable"]),
    ],
)
def test_a_wrong_batch_is_named_in_the_error(data, kwargs, needles):
    model = make_model()
    keys = set(model.state_dict())
    with pytest.raises(ValueError) as err:
        sa.add_adapter(model, "a", sa.SparseAdapterConfig(pruner="snip", **CFG), data=data, **kwargs)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    assert "iterable of batches" in message  # the accepted forms are spelled out
    assert set(model.state_dict()) == keys  # and the model is as it was


def test_calibration_batches_must_be_positive():
    with pytest.raises(ValueError, match="calibration_batches must be a positive int"):
        sa.add_adapter(
            make_model(), "a", sa.SparseAdapterConfig(pruner="snip", **CFG), data=dict_batches(1), calibration_batches=0
        )
