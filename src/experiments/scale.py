"""`python -m experiments.scale input=<folder> reference=<folder> [reference_mpp=0.5]`

How many micrometres a pixel of `input`'s images spans, measured from their nuclei against a
`reference` folder's (experiments.data.nuclei): the ratio of the two scales, and with the
reference's known `reference_mpp` (a scanner's, or your training images' `data.mpp`) the
input's mpp - what `+eval.external.<name>.mpp=`, predict's `mpp=` and a served request's `mpp`
column take. Both folders: images anywhere below them (class folders or none), H&E at their
native size. Options: images (at most this many of each folder, evenly spread over their
sorted names; default 50).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from experiments.console import configure_logging
from experiments.data.nuclei import relative_scale
from experiments.errors import DataError, UserError, report_user_errors
from experiments.predict import key_values, list_inputs

OPTIONS = {"input": "", "reference": "", "reference_mpp": "", "images": "50"}


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """scale's key=value arguments, checked."""
    values = key_values(argv, OPTIONS, __doc__, required=("input", "reference"))
    if not values["images"].isdigit() or int(values["images"]) < 1:
        raise UserError("images must be a positive integer. "
                        f"Received: images={values['images']!r}")
    if values["reference_mpp"]:
        try:
            positive = float(values["reference_mpp"]) > 0
        except ValueError:
            positive = False
        if not positive:
            raise UserError("reference_mpp must be a positive number (micrometres per pixel). "
                            f"Received: reference_mpp={values['reference_mpp']!r}")
    return values


def sample(files: Sequence[Path], count: int) -> list[Path]:
    """At most `count` of `files`, evenly spread over them (the same ones on every call)."""
    if len(files) <= count:
        return list(files)
    if count == 1:
        return [files[0]]
    return [files[round(i * (len(files) - 1) / (count - 1))] for i in range(count)]


def images_of(key: str, folder: str, count: int) -> list[Path]:
    files = list_inputs(folder)
    if not files:
        raise DataError(f"{key}={folder!r} holds no images")
    return sample(files, count)


def measure(input_files: Sequence[Path], reference_files: Sequence[Path]
            ) -> tuple[float, float, float]:
    """The input's and the reference's median nucleus diameters (px) and the input's mpp over
    the reference's; DataError when the images do not allow it."""
    try:
        return relative_scale(input_files, reference_files)
    except ValueError as error:
        raise DataError(str(error)) from error


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    count = int(args["images"])
    input_files = images_of("input", args["input"], count)
    reference_files = images_of("reference", args["reference"], count)
    target, reference, ratio = measure(input_files, reference_files)
    print(f"input: {len(input_files)} images, median nucleus {target:.1f} px; reference: "
          f"{len(reference_files)} images, {reference:.1f} px")
    print(f"A pixel of input spans {ratio:.2f}x what a pixel of reference does.")
    if args["reference_mpp"]:
        mpp = float(args["reference_mpp"]) * ratio
        print(f"input's mpp: {mpp:.3g} um/px (reference_mpp={float(args['reference_mpp']):g})")


if __name__ == "__main__":
    main()
