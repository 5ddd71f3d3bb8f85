"""The access security file read as EPICS reads it (broker/acf.py).

Whether a file loads is asked of EPICS itself: the access security library of the PCAS
that pcaspy ships (``asInitFile``, in a child process, as ``carelay up`` checks a file).
Every file below loads there exactly when it loads here, and the rules it loads grant
what asLib grants a client at pcaspy's level."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from carelay.broker import acf
from carelay.broker.acf import NONE, READ, WRITE, AcfError, parse

RULES = "ASG(DEFAULT) { RULE(1, READ) }\n"

FILES = {
    "nothing": "",
    "a comment alone": "# x\n",
    "a group with no body": "ASG(DEFAULT)\n",
    "a bare address": "HAG(cr) {192.168.1.10}\n" + RULES,
    "a host name that starts with a digit": "HAG(cr) {1host, opi1.lab.example.org}\n" + RULES,
    "a last comment with no newline": RULES + "# end",
    "a keyword and more": "UAG(u) {RULEr, ASGx, INPAB}\n" + RULES,
    "a keyword alone as a name": "UAG(ASG) {x}\n" + RULES,
    "a number as a name": "UAG(a) {123}\n" + RULES,
    "carriage returns": "ASG(DEFAULT) {\r\n RULE(1, READ)\r\n}\r\n",
    "tabs": "ASG(DEFAULT)\t{\tRULE(1,READ)\t}\n",
    "a vertical tab": "ASG(DEFAULT)\x0b{ RULE(1,READ) }\n",
    "a form feed": "ASG(DEFAULT)\x0c{ RULE(1,READ) }\n",
    "keywords in lower case": "asg(DEFAULT) { RULE(1, READ) }\n",
    "RPC": "ASG(DEFAULT) { RULE(1, RPC) }\n",
    "an unknown right": "ASG(DEFAULT) { RULE(1, READWRITE) }\n",
    "a quoted right": 'ASG(DEFAULT) { RULE(1, "WRITE") }\n',
    "a log option": "ASG(DEFAULT) { RULE(1, WRITE, TRAPWRITE) RULE(1 , READ , NOTRAPWRITE ) }\n",
    "an unknown log option": "ASG(DEFAULT) { RULE(1, WRITE, TRAP) }\n",
    "an undefined UAG": "ASG(DEFAULT) { RULE(1, WRITE) { UAG(nope) } }\n",
    "an undefined HAG": "ASG(DEFAULT) { RULE(1, WRITE) { HAG(nope) } }\n",
    "a UAG defined after its rule": "ASG(DEFAULT) { RULE(1, WRITE) { UAG(a) } }\nUAG(a) {x}\n",
    "a HAG named as a UAG": "HAG(h) {x}\nASG(DEFAULT) { RULE(1, WRITE) { UAG(h) } }\n",
    "a HAG with no body": "HAG(a)\nASG(DEFAULT) { RULE(1, WRITE) { HAG(a) } }\n",
    "a UAG and a HAG of one name": "UAG(a) {x}\nHAG(a) {y}\n" + RULES,
    "a UAG twice": "UAG(a) {x}\nUAG(a) {y}\n" + RULES,
    "an ASG twice": RULES + "ASG(DEFAULT) { RULE(1, WRITE) }\n",
    "an empty list": "UAG(a) {}\n" + RULES,
    "an empty rule body": "ASG(DEFAULT) { RULE(1, READ) {} }\n",
    "an empty group body": "ASG(DEFAULT) {}\n",
    "a trailing comma": "UAG(a) {x,}\n" + RULES,
    "a comma between rules": "ASG(DEFAULT) { RULE(1, READ), RULE(1, WRITE) }\n",
    "quoted names": 'UAG("a b") {"x y", "z#w", "role/ops", "jürgen", ""}\n'
    'ASG("DEFAULT") { RULE(1, READ) { UAG("a b") } }\n',
    "an escaped quote": 'UAG(a) {"x\\"y", "\\q"}\n' + RULES,
    "a newline in quotes": 'UAG(a) {"x\ny"}\n' + RULES,
    "an escaped newline": 'UAG(a) {"x\\\ny"}\n' + RULES,
    "a slash unquoted": "UAG(a) {role/x}\n" + RULES,
    "an at sign unquoted": "UAG(a) {x@y}\n" + RULES,
    "non-ASCII unquoted": "UAG(a) {jürgen}\n" + RULES,
    "every name character": "UAG(a) {+x-<y>[z].:;_9}\n" + RULES,
    "level 0": "ASG(DEFAULT) { RULE(0, WRITE) }\n",
    "a negative level": "ASG(DEFAULT) { RULE(-1, WRITE) }\n",
    "a high level": "ASG(DEFAULT) { RULE(7, WRITE) }\n",
    "a hex level": "ASG(DEFAULT) { RULE(0x1, READ) }\n",
    "a quoted level": 'ASG(DEFAULT) { RULE("1", READ) }\n',
    "a level with letters": "ASG(DEFAULT) { RULE(1x, READ) }\n",
    "inputs and CALC": 'ASG(DEFAULT) { INPA("x:y") INPL(z) RULE(1, WRITE) { CALC("A=1") } '
    "INPB(w) }\n",
    "INPM": 'ASG(DEFAULT) { INPM("x:y") RULE(1, READ) }\n',
    "a group of inputs alone": "ASG(DEFAULT) { INPA(x) }\n",
    "UAGs in one rule": "UAG(a) {x}\nUAG(b) {y}\n"
    "ASG(DEFAULT) { RULE(1, WRITE) { UAG(a) UAG(b, a) HAG() } }\n",
    "a group other than DEFAULT": "ASG(OTHER) { RULE(1, READ) }\n",
    "a NUL at the end": RULES + "\x00",
    "a NUL that cuts a line": "UAG(a) {x}\nUAG(b) {y}\x00 broken(\nASG(DEFAULT)\n",
    "a NUL that starts a line": "ASG(DEFAULT)\n\x00 broken(\n",
    "a NUL first": "\x00ASG(DEFAULT)\n",
    "a NUL after a carriage return": RULES + "\r\x00\nASG(relay) { RULE(1, WRITE) }\n",
    "a NUL in a long line": "UAG(a) {x\x00" + " " * 250 + "}\n" + RULES,
    "a NUL at the end of a piece": "UAG(a) {" + "x" * 190 + "\x00" + "y" * 20 + "}\n" + RULES,
    "a NUL at the start of a piece": "UAG(a) {" + "x" * 191 + "\x00" + "y" * 20 + "}\n" + RULES,
    "carriage returns alone": "ASG(DEFAULT) { RULE(1, READ) }\r# later\rASG(relay) {}\r",
    "a carriage return in quotes": 'UAG(a) {"x\ry"}\n' + RULES,
    "a level beyond a C int": "ASG(DEFAULT) { RULE(4294967296, WRITE) RULE(2147483648, READ) }\n",
    "a level beyond a C long": "ASG(DEFAULT) { RULE(99999999999999999999, WRITE) }\n",
}

_ORACLE = """
import json, sys
from pcaspy import cas
print("LOADS" + json.dumps([cas.asInitFile(p, "") == 0 for p in sys.argv[1:]]))
"""


def epics_loads(tmp_path, texts: list[str]) -> list[bool]:
    """Whether EPICS's access security library loads each text (one child process)."""
    paths = []
    for i, text in enumerate(texts):
        path = tmp_path / f"{i}.acf"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        paths.append(str(path))
    r = subprocess.run(
        [sys.executable, "-c", _ORACLE, *paths], capture_output=True, text=True, timeout=60
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("LOADS")), None)
    assert line is not None, r.stdout + r.stderr
    return json.loads(line[5:])


def loads(text: str) -> bool:
    try:
        parse(text)
    except AcfError:
        return False
    return True


#: What asLib grants a client: the file loaded, a member of GROUP and a client of LEVEL,
#: USER and HOST added (asAddMember, asAddClient through ctypes, from pcaspy's own
#: library), its access read from the client (ASGCLIENT; where, found by calibration:
#: the offset at which files granting NONE, READ and WRITE read 0, 1 and 2).
_GRANTS = """
import ctypes, json, sys
from pcaspy import cas
import pcaspy._cas as m
lib = ctypes.CDLL(m.__file__)
P = ctypes.POINTER(ctypes.c_void_p)
lib.asAddMember.argtypes = [P, ctypes.c_char_p]
lib.asAddClient.argtypes = [P, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]
keep = []
def client(path, group, level, user, host):
    assert cas.asInitFile(path, "") == 0, path
    mem, cli = ctypes.c_void_p(), ctypes.c_void_p()
    g, u, h = (ctypes.create_string_buffer(x.encode()) for x in (group, user, host))
    keep.extend((g, u, h, mem, cli))
    assert lib.asAddMember(ctypes.byref(mem), g) == 0
    assert lib.asAddClient(ctypes.byref(cli), mem, level, u, h) == 0
    return cli.value
calibration, cases = json.loads(sys.stdin.read())
offsets = [o for o in range(0, 128, 4) if all(
    ctypes.c_int.from_address(client(p, "DEFAULT", 1, "u", "h") + o).value == want
    for p, want in calibration)]
out = []
for path, group, level, user, host in cases:
    at = client(path, group, level, user, host)
    out.append(ctypes.c_int.from_address(at + offsets[0]).value if offsets else None)
print("GRANTS" + json.dumps(out))
"""


def epics_grants(tmp_path, cases: list[tuple[str, str, int, str, str]]) -> list[int] | None:
    """What EPICS grants each (text, group, level, user, host); None if the client's
    access could not be found in the library's structure (then nothing is compared)."""
    calibration = []
    for want, right in enumerate(("NONE", "READ", "WRITE")):
        path = tmp_path / f"calibrate-{right}.acf"
        path.write_text(f"ASG(DEFAULT) {{ RULE(1, {right}) }}\n")
        calibration.append((str(path), want))
    runs = []
    for i, (text, *rest) in enumerate(cases):
        path = tmp_path / f"grant-{i}.acf"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        runs.append((str(path), *rest))
    r = subprocess.run(
        [sys.executable, "-c", _GRANTS],
        input=json.dumps([calibration, runs]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("GRANTS")), None)
    assert line is not None, r.stdout + r.stderr
    grants = json.loads(line[6:])
    return None if None in grants else grants


def granted_here(text: str, group: str, level: int, user: str, host: str) -> int:
    acf_ = parse(text)
    uags = {name for name, members in acf_.uags.items() if user in members}
    hags = {name for name, hosts in acf_.hags.items() if host in hosts}
    return acf_.access(group, uags, hags, level)


GRANT_FILES = [
    FILES["carriage returns alone"].replace("{}", "{ RULE(1, WRITE) }"),
    FILES["a level beyond a C int"],
    FILES["a level beyond a C long"],
    FILES["a NUL after a carriage return"],
    "UAG(ops) {alice}\nHAG(cr) {opi1, 10.0.0.1}\nASG(DEFAULT) {\n RULE(1, READ)\n"
    " RULE(1, WRITE) { UAG(ops) HAG(cr) }\n RULE(0, WRITE) { UAG(ops) }\n}\n"
    "ASG(relay) { RULE(2, WRITE) { HAG(cr) } RULE(1, NONE) }\n",
]


def test_what_a_file_grants_here_is_what_epics_grants(tmp_path):
    cases = [
        (text, group, level, user, host)
        for text in GRANT_FILES
        for group in ("DEFAULT", "relay", "other")
        for level in (0, 1)
        for user, host in (("alice", "opi1"), ("alice", "10.0.0.1"), ("bob", "opi1"))
    ]
    grants = epics_grants(tmp_path, cases)
    if grants is None:
        pytest.skip("the client's access is not where calibration looks in this EPICS")
    differ = [(c[1:], g) for c, g in zip(cases, grants, strict=True) if granted_here(*c) != g]
    assert not differ, differ
    assert {0, 1, 2} <= set(grants)  # the cases ask all three


def test_a_file_loads_here_exactly_when_it_loads_in_epics(tmp_path):
    names = list(FILES)
    verdicts = epics_loads(tmp_path, [FILES[n] for n in names])
    assert sum(verdicts) > 15 and not all(verdicts)  # the corpus asks both ways
    differ = [(n, v) for n, v in zip(names, verdicts, strict=True) if loads(FILES[n]) != v]
    assert not differ, differ


def test_words_are_cut_as_asLibs_scanner_cuts_them():  # noqa: N802 - asLib's name
    a = parse(FILES["a bare address"] + FILES["a keyword and more"].replace(RULES, ""))
    assert a.hags == {"cr": {"192.168.1.10"}}
    assert a.uags == {"u": {"RULEr", "ASGx", "INPAB"}}
    assert parse(FILES["quoted names"]).uags == {"a b": {"x y", "z#w", "role/ops", "jürgen", ""}}
    assert parse(FILES["an escaped quote"]).uags == {"a": {'x\\"y', "\\q"}}  # kept as written
    assert parse(FILES["a NUL that cuts a line"]).asgs == {"DEFAULT": []}
    assert parse(FILES["a NUL that starts a line"]).asgs == {"DEFAULT": []}


def test_an_error_says_where():
    with pytest.raises(AcfError, match=r"line 3: '\}' where 'RULE' belongs"):
        parse("UAG(a) {x}\nASG(DEFAULT) {\n}\n")
    with pytest.raises(AcfError, match="line 2: invalid character '@'"):
        parse("UAG(a) {x}\nUAG(b) {x@y}\n")
    with pytest.raises(AcfError, match=r"line 1: no UAG\(b\) before"):
        parse("ASG(DEFAULT) { RULE(1, WRITE) { UAG(b) } }")
    with pytest.raises(AcfError, match="defines nothing"):
        parse("# nothing\n")


ACF = """
UAG(ops) {alice, bob}
UAG(guests) {carol}
HAG(cr) {opi1}
ASG(DEFAULT) {
    RULE(1, READ)
    RULE(1, WRITE) { UAG(ops) HAG(cr) }
    RULE(1, WRITE) { UAG(guests) CALC("1") }
    RULE(0, WRITE) { UAG(guests) }
    RULE(2, NONE) { UAG(ops) }
}
ASG(CLOSED) {
    RULE(1, READ) { UAG(ops, guests) }
}
"""


@pytest.mark.parametrize(
    ("group", "uags", "hags", "granted"),
    [
        ("DEFAULT", set(), set(), READ),
        ("DEFAULT", {"ops"}, {"cr"}, WRITE),  # every condition met
        ("DEFAULT", {"ops"}, set(), READ),  # the HAG missing
        ("DEFAULT", {"guests"}, {"cr"}, READ),  # a CALC is never met; level 0 is below
        ("CLOSED", {"guests"}, set(), READ),  # any UAG of a rule's list
        ("CLOSED", set(), {"cr"}, NONE),
        ("ELSEWHERE", {"ops"}, {"cr"}, WRITE),  # an undefined group: DEFAULT's rules
    ],
)
def test_what_a_client_at_pcaspys_level_is_granted(group, uags, hags, granted):
    assert parse(ACF).access(group, uags, hags) == granted


def test_a_rule_of_level_0_grants_a_client_of_level_0():
    assert parse(ACF).access("DEFAULT", {"guests"}, set(), level=0) == WRITE
    assert acf.CLIENT_LEVEL == 1


def test_no_group_at_all_grants_nothing():
    assert parse("ASG(OTHER) { RULE(1, WRITE) }").access("DEFAULT", set(), set()) == NONE
