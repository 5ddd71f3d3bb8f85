"""The access security file (ACF) read as EPICS reads it, for the front-ends without PCAS.

The CA brokers hand the file to the access security library of the PCAS that pcaspy
ships (EPICS 3.14's asLib).  The PVA front-end cannot load that library (pcaspy and p4p
never share a process), so it reads the file here, by asLib's own grammar:

- the words are cut as asLib's flex scanner cuts them: the longest match wins, and of
  two as long the keyword (``UAG``, ``HAG``, ``ASG``, ``RULE``, ``CALC``, ``INPA`` to
  ``INPL``) before the number before the name.  So ``192.168.1.10``, ``1host`` and
  ``RULEr`` are names, ``12`` is a number; a name holds letters, digits and
  ``_-+:.[]<>;``, anything else goes in double quotes (``"role/ops"``), where a
  backslash keeps the next character; ``#`` starts a comment to the end of the line;
  blanks are spaces, tabs and carriage returns; a NUL ends its piece of a line
  (``_as_read``); the file is read as bytes, no newline translated (``read_acf``);
- the grammar is asLib's: a file of at least one ``UAG``, ``HAG`` or ``ASG``, each with
  its body or none; an ``ASG`` body of ``INPx(...)`` and ``RULE(level, NONE|READ|WRITE
  [, TRAPWRITE|NOTRAPWRITE])`` with a body of ``UAG(...)``, ``HAG(...)`` and
  ``CALC(...)`` or none; no empty body or list, no trailing comma;
- what asLib refuses besides the grammar is refused too: a group defined twice, a rule
  naming a UAG or HAG not defined before it.  Not a CALC expression that asLib cannot
  compile: a file is read here only after asLib accepted it (``check_access_security``).

A rule grants its access to a client at a level no higher than the rule's, that is in
one of its UAGs (if it names any), at one of its HAGs (if it names any) and for which
its CALC holds (if it has one: never, here, as the relay reads no INP PVs); the client
gets the most any rule grants (asLib's asComputePvt).  pcaspy adds every CA client at
level 1, so a ``RULE(0, ...)`` grants relay clients nothing (``CLIENT_LEVEL``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CLIENT_LEVEL",
    "NONE",
    "READ",
    "WRITE",
    "Acf",
    "AcfError",
    "Rule",
    "as_read",
    "parse",
    "read_acf",
    "read_only_copy",
    "strip_comments",
]

#: Access rights, as asLib orders them (WRITE includes READ).
NONE, READ, WRITE = 0, 1, 2
_RIGHTS = {"NONE": NONE, "READ": READ, "WRITE": WRITE}

#: The level pcaspy gives every CA client of a relay PV (its asAddClient call): a rule
#: applies to a client whose level is at most the rule's.
CLIENT_LEVEL = 1


class AcfError(ValueError):
    """The file is not one asLib loads; says where and why."""


@dataclass(frozen=True)
class Rule:
    level: int
    access: int
    uags: frozenset[str] = frozenset()
    hags: frozenset[str] = frozenset()
    calc: bool = False


@dataclass
class Acf:
    """What a file defines: each UAG's members, each HAG's hosts, each ASG's rules."""

    uags: dict[str, set[str]] = field(default_factory=dict)
    hags: dict[str, set[str]] = field(default_factory=dict)
    asgs: dict[str, list[Rule]] = field(default_factory=dict)

    def rules_of(self, group: str) -> list[Rule]:
        """The rules for a member of ``group``: those of ``DEFAULT`` where the file does not
        define it, as asLib does, and none if it defines neither."""
        return self.asgs.get(group, self.asgs.get("DEFAULT", []))

    def access(self, group: str, uags: set[str], hags: set[str], level: int = CLIENT_LEVEL):
        """What a client in ``uags`` at ``hags`` gets in ``group``: NONE, READ or WRITE."""
        granted = NONE
        for rule in self.rules_of(group):
            if level > rule.level or rule.access <= granted or rule.calc:
                continue
            if rule.uags and not rule.uags & uags:
                continue
            if rule.hags and not rule.hags & hags:
                continue
            granted = rule.access
        return granted


# -- the scanner --------------------------------------------------------------------------

#: (kind, pattern) in asLib's order: of two matches as long, the earlier kind wins.
_TOKENS = [
    ("KEYWORD", re.compile(r"UAG|HAG|ASG|RULE|CALC")),
    ("INP", re.compile(r"INP[A-L]")),
    ("INTEGER", re.compile(r"[0-9]+")),
    ("NAME", re.compile(r"[a-zA-Z0-9_\-+:.\[\]<>;]+")),
    ("QUOTED", re.compile(r'"(?:[^"\n\\]|\\[^\n])*"')),
]
_BLANK = " \t\r"
#: What one ``fgets`` of asLib's reader takes at most (its buffer, the terminator aside).
_LINE_PIECE = 199
_PUNCTUATION = "(){},"


@dataclass(frozen=True)
class _Token:
    kind: str  # KEYWORD, INP, INTEGER, STRING, or the punctuation itself; END at the end
    text: str
    line: int
    #: Where it starts in the text read (``_as_read``).
    at: int = 0


def as_read(text: str) -> str:
    """``text`` as asLib reads it: the same, unless it holds a NUL (``_as_read``)."""
    return _as_read(text) if "\0" in text else text


def _as_read(text: str) -> str:
    """What asLib reads of ``text``: ``fgets`` pieces of at most _LINE_PIECE bytes, each
    up to and with a newline, each taken as a C string, so that a NUL ends its piece
    there (the piece's newline too), and the file where it starts a piece."""
    raw = text.encode("utf-8", "surrogateescape")
    out = []
    for line in raw.split(b"\n"):
        line += b"\n"
        for at in range(0, len(line), _LINE_PIECE):
            piece = line[at : at + _LINE_PIECE].split(b"\0", 1)[0]
            if not piece:
                return b"".join(out).decode("utf-8", "surrogateescape")
            out.append(piece)
    return b"".join(out)[:-1].decode("utf-8", "surrogateescape")  # the newline added last


def _scan(text: str) -> list[_Token]:
    if "\0" in text:
        text = _as_read(text)
    tokens: list[_Token] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
            continue
        if c in _BLANK:
            i += 1
            continue
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        best_kind, best = "", ""
        for kind, pattern in _TOKENS:
            m = pattern.match(text, i)
            if m is not None and len(m[0]) > len(best):
                best_kind, best = kind, m[0]
        if best:
            if best_kind == "NAME":
                tokens.append(_Token("STRING", best, line, i))
            elif best_kind == "QUOTED":
                tokens.append(_Token("STRING", best[1:-1], line, i))  # escapes kept
            elif best_kind == "KEYWORD":
                tokens.append(_Token(best, best, line, i))
            else:
                tokens.append(_Token(best_kind, best, line, i))
            i += len(best)
            continue
        if c in _PUNCTUATION:
            tokens.append(_Token(c, c, line, i))
            i += 1
            continue
        raise AcfError(f"line {line}: invalid character {c!r}")
    tokens.append(_Token("END", "", line, n))
    return tokens


# -- the parser -----------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _scan(text)
        self.at = 0
        self.acf = Acf()

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self, kind: str) -> _Token:
        token = self.tokens[self.at]
        if token.kind != kind:
            what = repr(token.text) if token.kind != "END" else "the end of the file"
            raise AcfError(f"line {token.line}: {what} where {_said(kind)} belongs")
        self.at += 1
        return token

    def taking(self, kind: str) -> bool:
        if self.peek().kind == kind:
            self.at += 1
            return True
        return False

    def head(self) -> str:
        self.take("(")
        name = self.take("STRING").text
        self.take(")")
        return name

    def names(self) -> list[str]:
        """``a, b, c``: at least one."""
        out = [self.take("STRING").text]
        while self.taking(","):
            out.append(self.take("STRING").text)
        return out

    def parse(self) -> Acf:
        if self.peek().kind == "END":
            raise AcfError("line 1: the file defines nothing")
        while self.peek().kind != "END":
            token = self.peek()
            if token.kind in ("UAG", "HAG"):
                self.at += 1
                self.group(token, self.acf.uags if token.kind == "UAG" else self.acf.hags)
            elif token.kind == "ASG":
                self.at += 1
                self.asg(token)
            else:
                raise AcfError(f"line {token.line}: {token.text!r} where UAG, HAG or ASG belongs")
        return self.acf

    def group(self, token: _Token, groups: dict[str, set[str]]) -> None:
        name = self.head()
        if name in groups:
            raise AcfError(f"line {token.line}: {token.kind}({name}) is defined twice")
        groups[name] = set()
        if self.taking("{"):
            groups[name].update(self.names())
            self.take("}")

    def asg(self, token: _Token) -> None:
        name = self.head()
        if name in self.acf.asgs:
            raise AcfError(f"line {token.line}: ASG({name}) is defined twice")
        rules: list[Rule] = []
        self.acf.asgs[name] = rules
        if not self.taking("{"):
            return
        while True:
            if self.taking("INP"):
                self.head()
            elif self.peek().kind == "RULE":
                rules.append(self.rule(self.take("RULE")))
            else:
                self.take("RULE")  # says what belongs here
            if self.taking("}"):
                return

    def rule(self, token: _Token) -> Rule:
        self.take("(")
        level = _c_int(self.take("INTEGER").text)
        self.take(",")
        right = self.take("STRING")
        if right.text not in _RIGHTS:
            raise AcfError(f"line {right.line}: access rights must be NONE, READ or WRITE")
        if self.taking(","):
            trap = self.take("STRING")
            if trap.text not in ("TRAPWRITE", "NOTRAPWRITE"):
                raise AcfError(f"line {trap.line}: log options must be TRAPWRITE or NOTRAPWRITE")
        self.take(")")
        uags: set[str] = set()
        hags: set[str] = set()
        calc = False
        if self.taking("{"):
            while True:
                item = self.peek()
                if item.kind in ("UAG", "HAG"):
                    self.at += 1
                    self.take("(")
                    defined = self.acf.uags if item.kind == "UAG" else self.acf.hags
                    for name in self.names():
                        if name not in defined:
                            raise AcfError(f"line {item.line}: no {item.kind}({name}) before")
                        (uags if item.kind == "UAG" else hags).add(name)
                    self.take(")")
                elif item.kind == "CALC":
                    self.at += 1
                    self.head()
                    calc = True
                else:
                    where = f"line {item.line}: {item.text!r}"
                    raise AcfError(f"{where} where UAG, HAG or CALC belongs")
                if self.taking("}"):
                    break
        return Rule(level, _RIGHTS[right.text], frozenset(uags), frozenset(hags), calc)


def _c_int(digits: str) -> int:
    """The level asLib makes of ``digits``: a C long, saturated as strtol does, cut to a C
    int (a level beyond 2**31 - 1 is no high level: 4294967296 is 0, as in EPICS)."""
    value = min(int(digits), 2**63 - 1)
    return (value + 2**31) % 2**32 - 2**31


def read_acf(path) -> str:
    """The text of the file at ``path`` as asLib reads its bytes: no newline translated
    (a lone carriage return is a blank, not the end of a comment), bytes that are not
    UTF-8 kept as they are (surrogate escapes)."""
    return Path(path).read_bytes().decode("utf-8", "surrogateescape")


def strip_comments(text: str) -> str:
    """``text`` with its comments blanked out, as asLib's scanner skips them: from a ``#``
    outside double quotes to the end of its line (a newline; a carriage return does not
    end it)."""
    out = []
    quoted = escaped = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"' or c == "\n":
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        out.append(c)
        i += 1
    return "".join(out)


def rewrite_hags(text: str, hosts_of) -> str:
    """``text`` as asLib reads it, each HAG's list of hosts replaced by what
    ``hosts_of(hosts)`` returns (quoted names): the rest stays byte for byte.  Only the
    HAG definitions (at the top, with a body) are rewritten, never a quoted name that
    looks like one nor a rule's ``HAG(...)`` condition."""
    if "\0" in text:
        text = _as_read(text)
    tokens = _scan(text)
    out, done, depth = [], 0, 0
    for k, token in enumerate(tokens):
        if token.kind == "{":
            depth += 1
        elif token.kind == "}":
            depth -= 1
        if token.kind != "HAG" or depth != 0:
            continue
        head = [t.kind for t in tokens[k + 1 : k + 5]]
        if head != ["(", "STRING", ")", "{"]:
            continue
        opening = tokens[k + 4]
        end = next(j for j in range(k + 5, len(tokens)) if tokens[j].kind in ("}", "END"))
        if tokens[end].kind == "END":
            break
        hosts = [t.text for t in tokens[k + 5 : end] if t.kind == "STRING"]
        body = ", ".join(f'"{h}"' for h in hosts_of(hosts))
        out.append(text[done : opening.at + 1])
        out.append(f" {body} ")
        done = tokens[end].at
    out.append(text[done:])
    return "".join(out)


def read_only_copy(acf: Acf, group: str, name: str) -> str:
    """``ASG(name)``, which grants READ to the relay's clients that ``group`` grants READ
    or WRITE, and nothing to the others: its rules with WRITE read as READ.  A rule that
    grants no relay client anything is left out (NONE, a level below CLIENT_LEVEL, a
    CALC: see ``Acf.access``), so the copy needs no INP and no level but 1."""
    rules = []
    for rule in acf.rules_of(group):
        if rule.access == NONE or rule.level < CLIENT_LEVEL or rule.calc:
            continue
        conditions = [
            f"{kind}({', '.join(map(_quoted, sorted(names)))})"
            for kind, names in (("UAG", rule.uags), ("HAG", rule.hags))
            if names
        ]
        body = f" {{ {' '.join(conditions)} }}" if conditions else ""
        rules.append(f"    RULE({CLIENT_LEVEL}, READ){body}\n")
    return f"ASG({_quoted(name)})" + (f" {{\n{''.join(rules)}}}\n" if rules else "\n")


def _quoted(name: str) -> str:
    """A name as the file wrote it, in double quotes: a name read from a file keeps the
    escapes it had in quotes (``_scan``), and one read bare has nothing to escape."""
    return f'"{name}"'


def _said(kind: str) -> str:
    return {"STRING": "a name", "INTEGER": "a level", "END": "the end"}.get(kind, repr(kind))


def parse(text: str) -> Acf:
    """The UAGs, HAGs and ASGs of an access security file; AcfError where asLib would not
    load it."""
    return _Parser(text).parse()
