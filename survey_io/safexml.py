"""The one way survey_io parses XML: defusedxml, with no DTDs and no entities at all.

Survey XML (BlocksExchange, DJI XMP) never needs a DTD, and the standard library's parser
expands internal entities (a "billion laughs" file is stopped only by libexpat's own
amplification limit, if at all), so a file that declares either is refused in one line.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as _fromstring

from .errors import SurveyError

#: Raised for XML that is not well-formed (the standard library's error, re-exported for callers).
ParseError = ET.ParseError


def parse_xml(text: str | bytes, source: str | Path | None, what: str = "XML") -> ET.Element:
    """The root element of ``text``.

    Raises:
        SurveyError: naming ``source`` when the document declares a DTD or entities.
        ParseError: when it is not well-formed XML (callers word that themselves).
    """
    try:
        return _fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as err:
        raise SurveyError(source, f"{what} declares a DTD or entities ({type(err).__name__}); "
                                  "citygen refuses them (entity expansion)") from None
