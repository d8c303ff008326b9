"""The study page's grades as a DICOM Structured Report, for a PACS, OHIF or 3D Slicer: a Comprehensive
3D SR following TID 1500 (measurement report), written with highdicom, in the study of the source
images (their patient and study modules) as a new series.

One measurement group per target (25), tracked by its row id:

- **finding type**: the condition. No SNOMED CT or DCM code names these five conditions as graded
  here, so they are codes of a private scheme, ``99SPINEGRADE``, declared in the report's Coding
  Scheme Identification Sequence;
- **finding sites**: the level (SNOMED CT "Level of L4/L5 intervertebral disc" ...) and, for a sided
  condition, its laterality (SNOMED CT Left, Right: the patient's, from DICOM geometry);
- **qualitative evaluation**: SNOMED CT Severity = Moderate or Severe (SNOMED CT), or Normal/Mild
  (``99SPINEGRADE``: no single code means "normal or mild");
- **measurements**: the probability of each grade (``99SPINEGRADE`` codes, UCUM "no units");
- **method**: read by the models at a located point, or the training prior (``99SPINEGRADE``). A graded
  target's group is an image region: a SCOORD POINT on the exact source instance it was read at (the
  first, where a level was read on two series). A prior target's group has no region, and a TEXT item
  says why it got the prior.

SCOORD measures from the top-left corner of the top-left pixel; spinegrade's points are pixel centres
(0, 0 at the first pixel's centre), so a point is written at (x + 0.5, y + 0.5) and read back as the
stored value minus 0.5 (:func:`scoord_from_pixel`, :func:`pixel_from_scoord`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from spinegrade import __version__
from spinegrade.constants import CONDITION_SPECS, PROBABILITY_COLUMNS, SEVERITIES, condition_title
from spinegrade.errors import SpinegradeError
from spinegrade.logs import get_logger

log = get_logger(__name__)

SCHEME = "99SPINEGRADE"
SR_SERIES_NUMBER = 9901


def require_highdicom() -> None:
    """Refuse, in one line naming the package, a report asked for where highdicom is not installed."""
    _hd()


def _hd():
    try:
        import highdicom
    except ImportError:
        raise SpinegradeError("the DICOM Structured Report needs the highdicom package: pip install highdicom") from None
    return highdicom


def scoord_from_pixel(x: float, y: float) -> tuple[float, float]:
    """A pixel centre (spinegrade's coordinates) as SCOORD column, row (from the pixel's corner)."""
    return x + 0.5, y + 0.5


def pixel_from_scoord(column: float, row: float) -> tuple[float, float]:
    return column - 0.5, row - 0.5


def _private(value: str, meaning: str):
    return _hd().sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning)


def _codes() -> dict:
    from pydicom.sr.codedict import codes

    levels = dict(zip(("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"),
                      (codes.SCT.LevelOfL1L2IntervertebralDisc, codes.SCT.LevelOfL2L3IntervertebralDisc,
                       codes.SCT.LevelOfL3L4IntervertebralDisc, codes.SCT.LevelOfL4L5IntervertebralDisc,
                       codes.SCT.LevelOfL5S1IntervertebralDisc)))
    return {
        "levels": levels,
        "sides": {"left": codes.SCT.Left, "right": codes.SCT.Right},
        "conditions": {c: _private(c.upper(), condition_title(c)) for c in CONDITION_SPECS},
        "grades": dict(zip(SEVERITIES, (_private("NORMAL_MILD", "Normal/Mild"), codes.SCT.Moderate, codes.SCT.Severe))),
        "probabilities": {c: _private(f"P_{c.upper()}", f"Probability of {s}")
                          for c, s in zip(PROBABILITY_COLUMNS, SEVERITIES)},
        "severity": codes.SCT.Severity,
        "no_units": codes.UCUM.NoUnits,
        "model": _private("MODEL", "Graded by the models at a located point"),
        "prior": _private("PRIOR", "Training prior"),
        "reason": _private("PRIOR_REASON", "Why the training prior"),
        "procedure": codes.LN.MRIUnspecifiedBodyRegion,
    }


# The patient and study attributes an SR copies from its evidence; type 2: present, possibly empty.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _evidence(ds: pydicom.Dataset, file: Path) -> pydicom.Dataset:
    """A source header as the report's evidence: type 2 attributes it lacks added empty, and a UID it
    lacks made up (with a warning: the report then cannot point back at that file)."""
    hd = _hd()
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            setattr(ds, keyword, hd.UID())
            log.warning(f"{file}: no {keyword}; the structured report gives it a new one, which no file holds")
    if not ds.get("SOPClassUID"):
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage: what the reader accepts
    return ds


def write_structured_report(targets: list[dict], sources: dict[tuple[str, int], Path], models: dict, path: Path) -> Path:
    """The SR of one study's ``targets`` (``grades.json``'s), each point's source file found in
    ``sources`` by (SeriesInstanceUID, InstanceNumber); ``models``: ``grades.json``'s, named in the
    algorithm identification."""
    hd = _hd()
    c = _codes()
    headers: dict[Path, pydicom.Dataset] = {}

    def header(file: Path) -> pydicom.Dataset:
        if file not in headers:
            headers[file] = _evidence(pydicom.dcmread(file, stop_before_pixels=True), file)
        return headers[file]

    backbones = sorted({n for m in models.values() for n in m["backbones"]})
    algorithm = hd.sr.AlgorithmIdentification(name="spinegrade", version=__version__,
                                              parameters=backbones or None)
    groups, evidence = [], {}
    for t in targets:
        sites = [hd.sr.FindingSite(anatomic_location=c["levels"][t["level"]],
                                   laterality=c["sides"][t["side"]] if t["side"] else None)]
        evaluations = [hd.sr.QualitativeEvaluation(name=c["severity"], value=c["grades"][t["grade"]])]
        measurements = [hd.sr.Measurement(name=c["probabilities"][k], value=float(t["probabilities"][k]), unit=c["no_units"])
                        for k in PROBABILITY_COLUMNS]
        tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=t["row_id"])
        common = dict(tracking_identifier=tracking, finding_type=c["conditions"][t["condition"]], finding_sites=sites,
                      qualitative_evaluations=evaluations, measurements=measurements, algorithm_id=algorithm)
        point = t["points"][0] if t["source"] == "model" and t["points"] else None
        file = sources.get((point["series_uid"], point["instance"])) if point else None
        if file is not None:
            ds = header(file)
            evidence[ds.SOPInstanceUID] = ds
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POINT,
                graphic_data=np.array([scoord_from_pixel(point["x"], point["y"])], dtype=float),
                source_image=hd.sr.SourceImageForRegion(
                    referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID,
                    referenced_frame_numbers=[int(point["frame"])] if point.get("frame") else None))
            groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_region=region, method=c["model"], **common))
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(method=c["prior"], **common)
            why = t["source"].removeprefix("prior: ") if t["source"] != "model" else "its point's source image is unknown"
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                name=c["reason"], value=why[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
            groups.append(group)
    if not evidence:  # a study with no graded target still belongs to its study: any source image stands for it
        if not sources:
            raise SpinegradeError("no source image to place the structured report in its study")
        ds = header(next(iter(sources.values())))
        evidence[ds.SOPInstanceUID] = ds
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept(value="121007", scheme_designator="DCM", meaning="Device"),
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="spinegrade"))),
        procedure_reported=c["procedure"], imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(evidence=list(evidence.values()), content=report[0], series_instance_uid=hd.UID(),
                                 series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
                                 manufacturer="spinegrade", series_description="spinegrade grades")
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "spinegrade lumbar spine grading"
    scheme.CodingSchemeResponsibleOrganization = "spinegrade"
    sr.CodingSchemeIdentificationSequence = [scheme]
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path, enforce_file_format=True)
    return path
