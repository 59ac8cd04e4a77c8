"""A hardened XML parser for annotation files (PASCAL VOC and the like): the one parser
both dataset imports (``pipeline``) and evaluation (``models``) use.

expat directly, refusing any DOCTYPE, entity declaration or external entity (they can
read local files or blow up memory: "billion laughs"), with caps on depth and element
count; every element keeps its line number so errors can name it. (defusedxml would do
the same job; it is not a dependency.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat


class MalformedXml(ValueError):
    """Not well-formed, empty, too deep or too big."""


class UnsafeXml(MalformedXml):
    """A DTD or entity: refused whatever it says."""


@dataclass
class XmlNode:
    """An element: tag, attributes, text (stripped) and children, with its line number."""

    tag: str
    line: int
    attrs: dict[str, str] = field(default_factory=dict)
    text: str = ""
    children: list[XmlNode] = field(default_factory=list)

    def find(self, tag: str) -> XmlNode | None:
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list[XmlNode]:
        return [c for c in self.children if c.tag == tag]

    def findtext(self, tag: str, default: str | None = None) -> str | None:
        child = self.find(tag)
        return child.text if child is not None else default

    def iter(self, tag: str) -> list[XmlNode]:
        """Every element named ``tag`` in this subtree (this one included), in document order."""
        found = [self] if self.tag == tag else []
        for child in self.children:
            found += child.iter(tag)
        return found


MAX_XML_DEPTH = 64
MAX_XML_ELEMENTS = 200_000


def parse_xml(data: bytes, name: str) -> XmlNode:
    """Parse untrusted XML: UnsafeXml for DTDs/entities, MalformedXml when malformed."""
    parser = expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    stack: list[XmlNode] = []
    texts: list[list[str]] = []
    root: list[XmlNode] = []
    count = 0

    def refuse(what: str) -> None:
        raise UnsafeXml(
            f"{name} line {parser.CurrentLineNumber}: {what} are not allowed in annotation files "
            "(they can read local files or blow up memory); the file is refused"
        )

    def start(tag: str, attrs: dict[str, str]) -> None:
        nonlocal count
        count += 1
        if count > MAX_XML_ELEMENTS:
            raise MalformedXml(f"{name}: more than {MAX_XML_ELEMENTS} XML elements")
        if len(stack) >= MAX_XML_DEPTH:
            raise MalformedXml(f"{name} line {parser.CurrentLineNumber}: XML nested deeper than {MAX_XML_DEPTH}")
        node = XmlNode(tag, parser.CurrentLineNumber, dict(attrs))
        if stack:
            stack[-1].children.append(node)
        else:
            root.append(node)
        stack.append(node)
        texts.append([])

    def end(tag: str) -> None:
        node = stack.pop()
        node.text = "".join(texts.pop()).strip()

    def chars(text: str) -> None:
        if texts:
            texts[-1].append(text)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = lambda *a: refuse("DOCTYPE declarations")
    parser.EntityDeclHandler = lambda *a: refuse("entity declarations")
    parser.ExternalEntityRefHandler = lambda *a: refuse("external entities")  # type: ignore[assignment]
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise MalformedXml(
            f"{name} line {exc.lineno}: malformed XML ({expat.errors.messages[exc.code]})"
        ) from None
    if not root:
        raise MalformedXml(f"{name}: no XML element found")
    return root[0]


def parse_xml_file(path: Path | str) -> XmlNode:
    path = Path(path)
    return parse_xml(path.read_bytes(), path.name)
