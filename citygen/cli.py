"""The ``citygen`` command line: the only module that parses arguments.

Each subcommand is a plain function whose typed, documented parameters tyro turns into
flags.  Library code raises :class:`SurveyError` / :class:`CitygenError` for bad input;
here they become one line on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import tyro

from survey_io import SurveyError

from .errors import CitygenError

EXIT_BAD_INPUT = 2


def synth(out: Path, preset: str = "tiny", seed: int = 0) -> None:
    """Render a synthetic city drone survey (images with EXIF GPS, transforms.json, depth,
    semantics, ground-truth DSM and orthophoto GeoTIFFs, held-out test views).

    Args:
        out: output folder.
        preset: survey size: tiny (~60 images at 320x240) ... see `survey_io.synthetic.PRESETS`.
        seed: the city and the flight are deterministic for a seed.
    """
    from survey_io.synthetic import PRESETS, make_survey

    if preset not in PRESETS:
        raise CitygenError(None, f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    make_survey(out, PRESETS[preset], seed=seed)


def demo(out: Path = Path("outputs/demo"), seed: int = 0) -> None:
    """Run the whole pipeline on the built-in synthetic city and write a summary.

    Args:
        out: output folder (images, metrics, exports, summary.json).
        seed: seed of the synthetic city.
    """
    from .demo import run_demo

    run_demo(out, seed=seed)


# Subcommand name -> function. Each function's docstring is its help text.
COMMANDS: dict[str, Callable[..., None]] = {
    "synth": synth,
    "demo": demo,
}


def entrypoint(argv: list[str] | None = None) -> int:
    try:
        tyro.extras.subcommand_cli_from_dict(COMMANDS, prog="citygen", args=argv,
                                             description="citygen: city-scale neural reconstruction")
    except (SurveyError, CitygenError) as err:
        print(f"citygen: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("citygen: interrupted", file=sys.stderr)
        return 130
    return 0


def main() -> None:
    sys.exit(entrypoint())


if __name__ == "__main__":
    main()
