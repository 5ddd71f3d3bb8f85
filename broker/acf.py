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
  blanks are spaces, tabs and carriage returns; a NUL ends its line (``_as_read``);
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

__all__ = ["CLIENT_LEVEL", "NONE", "READ", "WRITE", "Acf", "AcfError", "Rule", "parse"]

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
_PUNCTUATION = "(){},"


@dataclass(frozen=True)
class _Token:
    kind: str  # KEYWORD, INP, INTEGER, STRING, or the punctuation itself; END at the end
    text: str
    line: int


def _as_read(text: str) -> str:
    """What asLib reads of ``text``: a line at a time, each as a C string, so a NUL ends
    its line there (that line's newline too), and the file where it starts a line."""
    out = []
    for line in text.splitlines(keepends=True):
        line = line.split("\0", 1)[0]
        if not line:
            break
        out.append(line)
    return "".join(out)


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
                tokens.append(_Token("STRING", best, line))
            elif best_kind == "QUOTED":
                tokens.append(_Token("STRING", best[1:-1], line))  # asLib keeps escapes
            elif best_kind == "KEYWORD":
                tokens.append(_Token(best, best, line))
            else:
                tokens.append(_Token(best_kind, best, line))
            i += len(best)
            continue
        if c in _PUNCTUATION:
            tokens.append(_Token(c, c, line))
            i += 1
            continue
        raise AcfError(f"line {line}: invalid character {c!r}")
    tokens.append(_Token("END", "", line))
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
        level = int(self.take("INTEGER").text)
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


def _said(kind: str) -> str:
    return {"STRING": "a name", "INTEGER": "a level", "END": "the end"}.get(kind, repr(kind))


def parse(text: str) -> Acf:
    """The UAGs, HAGs and ASGs of an access security file; AcfError where asLib would not
    load it."""
    return _Parser(text).parse()
