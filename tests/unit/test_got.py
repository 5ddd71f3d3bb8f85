"""broker/got.py: the GOT slots of pcaspy's extension, found by name."""

from __future__ import annotations

import pytest

from carelay.broker.got import find_slots, got_slots, load_base


@pytest.fixture(scope="module")
def extension() -> str:
    from pcaspy import _cas

    return _cas.__file__


def test_the_hooked_functions_have_slots_in_pcaspys_extension(extension):
    names = {"recv", "send", "accept", "freeListInitPvt"}
    slots = find_slots(extension, names)
    assert set(slots) == names and len(set(slots.values())) == len(names)
    assert got_slots(extension, {"recv"}) == {"recv": slots["recv"]}
    assert load_base(extension) > 0


def test_a_function_the_extension_does_not_import_is_named(extension):
    with pytest.raises(RuntimeError, match="imports no no_such_function$"):
        find_slots(extension, {"recv", "no_such_function"})


def test_what_is_no_elf_file_or_not_loaded_is_refused(tmp_path):
    text = tmp_path / "not.so"
    text.write_bytes(b"not an ELF file at all, " * 4)
    with pytest.raises(RuntimeError, match="not a 64-bit little-endian ELF file"):
        got_slots(str(text), {"recv"})
    with pytest.raises(RuntimeError, match="is not loaded"):
        load_base(str(text))
