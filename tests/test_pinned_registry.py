"""Page-locked host ranges (``loader.device_copy.PinnedRegistry``) never outlive, nor are trusted beyond, the memory
they lock. A range unmapped while still registered keeps its old pages locked; CUDA then answers "already
registered" for a new mapping at the same address and copies from it read the old pages -- another model's
weights (what the GPU suite's qwen3 loader test showed after earlier tests had dropped their mappings unclosed).

The CPU tests drive the registry against a stand-in for the two CUDA calls (the only part that needs a GPU); the
GPU test maps, copies and drops memory at a recycled address for real."""

import contextlib
import gc
import mmap
import weakref

import pytest
import torch

from tritonmoe.loader import device_copy
from tritonmoe.loader.device_copy import (CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED, CUDA_SUCCESS, PinnedRegistry,
                                          copy_spans_to_device, register_spans)

CHUNK = 1 << 16
CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713


class FakeDriver:
    """cudaHostRegister / cudaHostUnregister over a table of ranges, refusing overlaps as CUDA does."""

    def __init__(self):
        self.ranges: dict[int, int] = {}
        self.on_unregister = lambda ptr: None

    def cudaHostRegister(self, ptr, nbytes, flags):
        if any(ptr < p + n and p < ptr + nbytes for p, n in self.ranges.items()):
            return CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
        self.ranges[ptr] = nbytes
        return CUDA_SUCCESS

    def cudaHostUnregister(self, ptr):
        if self.ranges.pop(ptr, None) is None:
            return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED
        self.on_unregister(ptr)
        return CUDA_SUCCESS


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(device_copy, "_cudart", lambda: fake)
    monkeypatch.setattr(device_copy, "_clear_last_error", lambda: None)
    yield fake
    gc.collect()


def mapping(pieces: int = 3):
    m = mmap.mmap(-1, pieces * CHUNK)
    return torch.frombuffer(m, dtype=torch.uint8), weakref.ref(m)


def test_a_registry_dropped_unclosed_unregisters_while_its_memory_is_still_mapped(driver):
    base, alive = mapping()
    registry = PinnedRegistry()
    assert register_spans([(base, 0, base.numel())], registry, CHUNK)
    assert len(driver.ranges) == 3 and registry.registered_bytes == base.numel()
    del base
    gc.collect()
    assert alive() is not None, "the registry must keep the registered memory mapped"
    mapped_at_unregister = []
    driver.on_unregister = lambda ptr: mapped_at_unregister.append(alive() is not None)
    del registry  # no close(): a model dropped with its mapping
    gc.collect()
    assert driver.ranges == {} and mapped_at_unregister == [True] * 3
    assert alive() is None, "once unregistered, the mapping is released"


def test_already_registered_is_trusted_only_for_ranges_this_process_registered(driver):
    base, _ = mapping(2)
    first, second = base.data_ptr(), base.data_ptr() + CHUNK
    driver.ranges[first] = CHUNK  # page-locked by someone else (a registration whose mapping died, say)
    registry = PinnedRegistry()
    assert not registry.register(first, CHUNK, base), "a stranger's registration may hold other pages"
    assert registry.failed is None and registry.register(second, CHUNK, base), "one refusal does not stop the rest"

    sharer = PinnedRegistry()
    assert sharer.register(second, CHUNK, base), "registered by this process: shared"
    sharer.close()
    assert second in driver.ranges, "only the registry that registered a range unregisters it"
    registry.close()
    assert second not in driver.ranges and driver.ranges == {first: CHUNK}
    assert PinnedRegistry().register(second, CHUNK, base) and second in driver.ranges


def test_copy_spans_keeps_the_source_mapped_until_its_temporary_registration_ends(driver, monkeypatch):
    """Without a registry of its own, copy_spans_to_device registers for the call and unregisters before
    returning; the copies themselves (CUDA) are replaced by CPU copies here."""
    base, alive = mapping()
    base.copy_(torch.arange(base.numel(), dtype=torch.int64).to(torch.uint8))

    class Stream:
        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(device_copy, "_side_stream_after_allocations", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    registered = []
    real_register = PinnedRegistry.register
    monkeypatch.setattr(PinnedRegistry, "register",
                        lambda self, ptr, n, owner=None: registered.append(owner is base) or real_register(
                            self, ptr, n, owner))
    outs = copy_spans_to_device([(base, 100, 2 * CHUNK + 5)], "cpu", chunk_bytes=CHUNK)
    assert torch.equal(outs[0], base[100:2 * CHUNK + 5])
    assert registered == [True] * 3, "each piece names the tensor that keeps it mapped"
    assert driver.ranges == {}, "a call's own registrations end with the call"
    del base, outs
    gc.collect()
    assert alive() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (-m gpu on the GPU machine)")
def test_copies_from_a_recycled_address_read_the_new_memory():
    """Map, page-lock, copy and drop (unclosed) memory of one size again and again: the kernel tends to hand the
    same address back, and every copy must read what the new mapping holds."""
    addresses = set()
    for round_ in range(6):
        m = mmap.mmap(-1, 4 * CHUNK)
        base = torch.frombuffer(m, dtype=torch.uint8)
        base.fill_(round_ + 1)
        addresses.add(base.data_ptr())
        registry = PinnedRegistry()
        (out,) = copy_spans_to_device([(base, 0, base.numel())], "cuda", registry=registry, chunk_bytes=CHUNK)
        assert registry.registered_bytes == base.numel()
        assert int(out.min()) == int(out.max()) == round_ + 1, f"round {round_}: stale pages at {base.data_ptr():#x}"
        del registry, base, m, out
        gc.collect()
    print(f"{len(addresses)} distinct addresses in 6 rounds")
