"""MRML <-> core: the only SPDSegmentLib module that touches Slicer.

``slicer`` and ``vtk`` are imported inside the functions, so importing this module is cheap and
works without Slicer. It runs in desktop Slicer and on the ``slicer-core`` wheel (real MRML in plain
Python, no Qt). Long work runs in the SPD engine process (``SPDSegmentLib.engine``): read the nodes with
:func:`prepare_inputs` on the main thread, compute in the engine, then :func:`write_result` on the main thread.
The application facts the engine client needs (Slicer's Python, its startup environment, the version,
the exit signal) are read here too.

Frames: MRML stores RAS, the core works in LPS (``Volume.ijk_to_lps``). Every geometry read here is
taken to *world* coordinates (parent transforms applied, linear only), and every write goes back into
the target node's own coordinates, so the core never sees a transform.

Results are written through ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``: the segment
editor node's editable area (mask mode), editable intensity range and "modify other segments"
(overwrite mode) apply as for Slicer's own effects, and the state before the write is saved for undo.
Nothing is written unless the run succeeded.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.errors import InputError
from ..core.volume import LPS_TO_RAS, Volume, ijk_to_physical, validate_array

SPD_EDITOR_NODE_TAG = "SPDSegment"
AUDIT_COLOURS = {"kept": (0.1, 0.8, 0.2), "rejected": (0.9, 0.1, 0.1), "borrowed": (0.95, 0.85, 0.1),
                 "correction": (0.2, 0.55, 1.0)}
SALIENCY_COLOUR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileViridis.txt",
                            "vtkMRMLColorTableNodeFileColdToHotRainbow.txt", "vtkMRMLColorTableNodeRainbow")
MODES = ("set", "add", "remove")
MAX_UNDO_STATES = 10  # per segment editor node
AUDIT_NODE_NAME = "SPD audit"  # the audit point lists are "SPD audit kept", "... rejected", "... borrowed"
MINIMUM_SLICER = (5, 10)  # vtkSlicerSegmentEditorLogic; CMakeLists.txt and the README say the same


# ---------------------------------------------------------------- matrices and transforms

def _array_from_vtk_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], float)


def _vtk_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """4x4 RAS matrix from ``node``'s own coordinates to world (identity without a parent transform)."""
    transform = node.GetParentTransformNode() if node is not None else None
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise InputError(
            f"{node.GetName()!r} is under a non-linear transform ({transform.GetName()!r}). SPD works on a regular "
            "voxel grid: harden the transform on a copy (Data module > right-click > Harden transform) or resample "
            "the volume, then run again.")
    import vtk

    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _array_from_vtk_matrix(matrix)


# ---------------------------------------------------------------- reading nodes

_VOXELS: "OrderedDict[tuple, np.ndarray]" = OrderedDict()  # (node, image and scalars MTime) -> read-only view
KEEP_VOXELS = 2  # views kept (each keeps its node's voxel buffer alive until it goes, or the scene closes)


def volume_from_node(volume_node, name: Optional[str] = None) -> Volume:
    """A scalar volume node's voxels with its world geometry (parent transform applied), without a copy.

    The array is a read-only view of the node's voxel buffer: on the main thread nothing here reads or
    copies the voxels (a 512 x 512 x 600 CT is 300 MB), and whether they are finite is checked where
    they are used (the engine, :func:`run_spd_on_nodes`). The same node with unchanged voxels gives the
    same array object, so the engine client writes its voxels for the engine once; a change to the
    voxels (their modification time) gives a new one.
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        kind = volume_node.GetClassName() if volume_node is not None else "nothing"
        raise InputError(f"SPD needs a scalar volume, got {kind}. Select a scalar (grey-level) volume.")
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None and image.GetPointData() is not None else None
    if scalars is None:
        raise InputError(f"Volume {volume_node.GetName()!r} has no voxel data; load the image again.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(f"Volume {volume_node.GetName()!r} has {components} components per voxel; SPD needs a "
                         "scalar volume (convert it, e.g. with the Vector to Scalar Volume module).")
    dims = image.GetDimensions()
    if min(dims) < 1:
        raise InputError(f"Volume {volume_node.GetName()!r} is empty: {dims[0]} x {dims[1]} x {dims[2]} voxels.")
    key = (volume_node.GetID() or volume_node.GetAddressAsString("vtkObject"), image.GetAddressAsString("vtkObject"),
           image.GetMTime(), scalars.GetMTime(), tuple(dims))
    array = _VOXELS.pop(key, None)
    if array is None:
        from vtk.util import numpy_support

        array = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1])  # a view: (k, j, i)
        array.flags.writeable = False  # read-only for SPD; its content hash is computed once (Volume.fingerprint)
    _VOXELS[key] = array
    while len(_VOXELS) > KEEP_VOXELS:
        _VOXELS.popitem(last=False)
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = node_to_world(volume_node) @ _array_from_vtk_matrix(matrix)
    return Volume(array=array, ijk_to_lps=LPS_TO_RAS @ ijk_to_ras, name=name or volume_node.GetName())


def forget_volumes() -> None:
    """Release the voxel views held for volume nodes (the scene was closed)."""
    _VOXELS.clear()


def points_from_markups(markups_node):
    """Defined control points of a point list or curve, in world LPS, as a ``prompts.PointSet``.

    A point's description gives its kind, as in .mrk.json files (``prompts.kind_of_description``):
    "background" a background click (label 0), "correction" a trusted foreground correction, anything else
    a click. Undefined, preview and missing points are skipped.
    """
    from ..core.prompts import from_ras, kind_of_description

    if markups_node is None:
        raise InputError("Choose a point list (or curve) with clicks on the structure.")
    if not markups_node.IsA("vtkMRMLMarkupsNode"):
        raise InputError(f"{markups_node.GetName()!r} is a {markups_node.GetClassName()}, not a markups point list "
                         "or curve.")
    ras, kinds, names = [], [], []
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != markups_node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, position)
        ras.append(position)
        kinds.append(kind_of_description(markups_node.GetNthControlPointDescription(index)))
        names.append(markups_node.GetNthControlPointLabel(index) or "")
    source = markups_node.GetName()
    if not ras:
        raise InputError(f"Point list {source!r} has no placed points. Place at least one point on the structure.")
    return from_ras(np.array(ras, float), names=names, source=source, kinds=kinds)


def _geometry(geometry) -> np.ndarray:
    matrix = geometry.ijk_to_lps if isinstance(geometry, Volume) else np.asarray(geometry, float)
    if matrix.shape != (4, 4):
        raise InputError(f"Expected a Volume or a 4x4 ijk_to_lps matrix, got shape {matrix.shape}.")
    return matrix


def oriented_image(array: np.ndarray, geometry, parent_node=None):
    """A ``vtkOrientedImageData`` of ``array`` (k, j, i) on ``geometry`` (world), in ``parent_node``'s frame."""
    import slicer
    from vtk.util import numpy_support

    array = np.ascontiguousarray(array)
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    world_to_node = np.linalg.inv(node_to_world(parent_node))
    image.SetImageToWorldMatrix(_vtk_matrix(world_to_node @ LPS_TO_RAS @ _geometry(geometry)))
    return image


def _image_to_array(image) -> np.ndarray:
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


def segment_array(segmentation_node, segment_id: str, geometry) -> np.ndarray:
    """The segment as uint8 0/1 (k, j, i) on a volume's grid (``Volume``, volume node or 4x4 ijk_to_lps)."""
    import slicer

    if hasattr(geometry, "GetIJKToRASMatrix"):
        geometry = volume_from_node(geometry)
    matrix = _geometry(geometry)
    shape = geometry.shape if isinstance(geometry, Volume) else None
    if shape is None:
        raise InputError("segment_array needs a Volume or a volume node to know the grid size.")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise InputError(f"Segment {segment_id!r} is not in {segmentation_node.GetName()!r}.")
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap)  # world coordinates (parent transform applied)
    reference = oriented_image(np.zeros(shape, np.uint8), matrix)
    out = slicer.vtkOrientedImageData()
    extent = labelmap.GetExtent()
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
        return np.zeros(shape, np.uint8)
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, out, False)
    return (_image_to_array(out) == segment.GetLabelValue()).astype(np.uint8)


# ---------------------------------------------------------------- segment editor logic

# Where a write may go and which other segments it may take voxels from, named as in the Segment Editor's
# Masking section ("Editable area", "Modify other segments"). The module and the console API default to
# leaving other segments as they are and writing everywhere; the effect uses the Segment Editor's own settings.
OVERWRITE_CHOICES = ("allow overlap", "overwrite visible", "overwrite all")
EDITABLE_AREAS = ("everywhere", "inside all segments", "inside visible segments", "outside all segments",
                  "outside visible segments", "inside one segment")
DEFAULT_OVERWRITE, DEFAULT_EDITABLE_AREA = OVERWRITE_CHOICES[0], EDITABLE_AREAS[0]

_LOGICS_BY_ID: Dict[str, Any] = {}  # editor node (C++ address) -> (its editor logic, its scene's address)
_STAMPS_AFTER_WRITE: Dict[str, list] = {}  # segmentation node -> content stamps after SPD's writes (own history)


def editor_logic_for(editor_node):
    """The ``vtkSlicerSegmentEditorLogic`` bound to ``editor_node`` (one per node, so undo history persists
    until the scene closes, when :func:`release_editor_logics` lets it go)."""
    import slicer

    if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
        raise InputError("Writing segments from the SPD module needs Slicer {}.{} or later "
                         "(vtkSlicerSegmentEditorLogic).".format(*MINIMUM_SLICER))
    key = editor_node.GetAddressAsString("vtkObject")  # the C++ object, whatever its Python wrapper
    logic = _LOGICS_BY_ID.get(key, (None, None))[0]
    if logic is None or logic.GetSegmentEditorNode() is not editor_node:
        scene = editor_node.GetScene()
        logic = slicer.vtkSlicerSegmentEditorLogic()
        logic.SetMRMLScene(scene)
        logic.SetSegmentEditorNode(editor_node)
        logic.SetMaximumNumberOfUndoStates(MAX_UNDO_STATES)
        _LOGICS_BY_ID[key] = (logic, scene.GetAddressAsString("vtkObject") if scene is not None else None)
        on_scene_closed(release_editor_logics)  # desktop Slicer's scene (see on_scene_closed for others)
    return logic


def release_editor_logics(scene=None) -> int:
    """Forget the editor logics of ``scene`` (every scene: None) and SPD's undo records there; their undo states
    hold copies of the segments (patient data). Runs when a scene starts closing. Returns how many logics went."""
    address = scene.GetAddressAsString("vtkObject") if scene is not None else None
    gone = [key for key, (_, owner) in _LOGICS_BY_ID.items() if address is None or owner == address]
    for key in gone:
        _LOGICS_BY_ID.pop(key)[0].SetSegmentEditorNode(None)
    for key in [key for key, (owner, _) in _STAMPS_AFTER_WRITE.items() if address is None or owner == address]:
        del _STAMPS_AFTER_WRITE[key]
    return len(gone)


def spd_editor_node(scene):
    """The scene's SPD segment editor node (a singleton) through which the module and the console API write;
    :func:`configure_editor` sets its masking before each write."""
    import slicer

    node = scene.GetSingletonNode(SPD_EDITOR_NODE_TAG, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = slicer.vtkMRMLSegmentEditorNode()
        node.SetSingletonTag(SPD_EDITOR_NODE_TAG)
        node.SetName("SPDSegmentEditor")
        node.SetHideFromEditors(True)
        scene.AddNode(node)
        configure_editor(node)
    return node


def configure_editor(editor_node, overwrite: str = DEFAULT_OVERWRITE, editable_area: str = DEFAULT_EDITABLE_AREA,
                     mask_segment_id: Optional[str] = None) -> None:
    """Set the masking of ``editor_node`` by the Segment Editor's names: ``overwrite`` one of
    :data:`OVERWRITE_CHOICES`, ``editable_area`` one of :data:`EDITABLE_AREAS` ("inside one segment" needs
    ``mask_segment_id``). The source-volume intensity range is left as it is."""
    import slicer

    _check_choice(overwrite, OVERWRITE_CHOICES, "overwrite")
    _check_choice(editable_area, EDITABLE_AREAS, "editable_area")
    if (editable_area == "inside one segment") != bool(mask_segment_id):
        raise InputError("The editable area 'inside one segment' needs the id of that segment (mask_segment_id), "
                         "and only that area takes one.", setting="editable_area")
    node_class, segmentation_class = slicer.vtkMRMLSegmentEditorNode, slicer.vtkMRMLSegmentationNode
    editor_node.SetOverwriteMode({"allow overlap": node_class.OverwriteNone,
                                  "overwrite visible": node_class.OverwriteVisibleSegments,
                                  "overwrite all": node_class.OverwriteAllSegments}[overwrite])
    editor_node.SetMaskMode({"everywhere": segmentation_class.EditAllowedEverywhere,
                             "inside all segments": segmentation_class.EditAllowedInsideAllSegments,
                             "inside visible segments": segmentation_class.EditAllowedInsideVisibleSegments,
                             "outside all segments": segmentation_class.EditAllowedOutsideAllSegments,
                             "outside visible segments": segmentation_class.EditAllowedOutsideVisibleSegments,
                             "inside one segment": segmentation_class.EditAllowedInsideSingleSegment}[editable_area])
    editor_node.SetMaskSegmentID(mask_segment_id or None)


def _check_choice(value, choices, setting: str) -> None:
    if value not in choices:
        what = {"overwrite": "setting for other segments", "editable_area": "editable area"}[setting]
        raise InputError(f"Unknown {what} {value!r}; use one of {', '.join(choices)}.", setting=setting)


def _resolve_target(target):
    """(editor_node, segmentation_node, segment_id) from an editor node or (segmentation, segment_id, volume)."""
    if hasattr(target, "GetSegmentationNode") and hasattr(target, "GetMaskMode"):
        editor_node = target
        segmentation_node = editor_node.GetSegmentationNode()
        segment_id = editor_node.GetSelectedSegmentID()
        if segmentation_node is None or not segment_id:
            raise InputError("Select a segmentation and a segment in the Segment Editor first.")
        return editor_node, segmentation_node, segment_id
    try:
        segmentation_node, segment_id, source_volume_node = target
    except (TypeError, ValueError):
        raise InputError("Target must be a segment editor node or (segmentation node, segment id, source volume "
                         "node).") from None
    editor_node = spd_editor_node(segmentation_node.GetScene())
    if editor_node.GetSegmentationNode() is not segmentation_node:
        editor_node.SetAndObserveSegmentationNode(segmentation_node)
    if source_volume_node is not None and editor_node.GetSourceVolumeNode() is not source_volume_node:
        editor_node.SetAndObserveSourceVolumeNode(source_volume_node)
    editor_node.SetSelectedSegmentID(segment_id)
    return editor_node, segmentation_node, segment_id


def modifier_labelmap(mask: np.ndarray, geometry, segmentation_node, reference_geometry=None):
    """The mask as a modifier labelmap in the segmentation's frame, resampled onto its reference geometry.

    ``reference_geometry`` is a serialised geometry string or a ``vtkOrientedImageData`` (e.g. a scripted
    effect's ``defaultModifierLabelmap()``); without one the mask keeps its own grid.
    """
    import slicer

    mask = np.asarray(mask)
    matrix = _geometry(geometry)
    if mask.ndim != 3:
        raise InputError(f"The mask must be 3D (k, j, i), got shape {mask.shape}.")
    image = oriented_image((mask > 0).astype(np.uint8), matrix, segmentation_node)
    if reference_geometry is None:
        return image
    if isinstance(reference_geometry, str):
        reference = slicer.vtkOrientedImageData()
        slicer.vtkSegmentationConverter.DeserializeImageGeometry(reference_geometry, reference, False)
    else:
        reference = reference_geometry
    if slicer.vtkOrientedImageDataResample.DoGeometriesMatch(image, reference) and \
            slicer.vtkOrientedImageDataResample.DoExtentsMatch(image, reference):
        return image
    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, reference, out, False)
    return out


def ran_on(result) -> Optional[Tuple[int, list]]:
    """(axis, slices) where a run's mask is its answer: the slices it decoded and any slice its mask touches.
    None for a bare mask (no ``axis``): the mask answers everywhere."""
    axis = getattr(result, "axis", None)
    if axis is None:
        return None
    mask = np.asarray(result.mask)
    touched = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != int(axis))))[0]
    return int(axis), sorted({int(t) for t in getattr(result, "slices", None) or []} | {int(t) for t in touched})


def modification_steps(mask: np.ndarray, mode: str = "set", slices=None):
    """The segment editor modifications that write ``mask``: a list of (uint8 array, mode), mode one of :data:`MODES`.

    ``slices`` = (axis, slice numbers) limits "set" to those slices (where the run ran): there the segment
    becomes the mask, elsewhere it stays as it is. Slicer's Set mode always clears the whole segment first
    (vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap: its extent limits only the paint), so a limited set
    is an erase of what the mask leaves out, then a paint of the mask, both confined to those slices, as the
    Erase and Paint effects would do them (with the same masking and overwrite rules).
    """
    if mode not in MODES:
        raise InputError(f"Unknown modification mode {mode!r}; use one of {MODES}.")
    mask = (np.asarray(mask) > 0).astype(np.uint8)
    if mode != "set" or slices is None:
        return [(mask, mode)]
    axis, numbers = int(slices[0]), [int(t) for t in slices[1]]
    region = np.zeros(mask.shape, bool)
    index = [slice(None)] * 3
    index[axis] = [t for t in numbers if 0 <= t < mask.shape[axis]]
    region[tuple(index)] = True
    return [((region & (mask == 0)).astype(np.uint8), "remove"), ((region & (mask > 0)).astype(np.uint8), "add")]


def apply_mask_to_segment(target, mask: np.ndarray, geometry, mode: str = "set", editor_logic=None,
                          save_undo: bool = True, slices=None) -> str:
    """Write ``mask`` (k, j, i on ``geometry``) into a segment as a Slicer effect would; return the segment id.

    ``target``: a ``vtkMRMLSegmentEditorNode`` (its segmentation, selected segment, editable area, intensity
    mask and overwrite settings are used) or ``(segmentation_node, segment_id, source_volume_node)`` (the
    scene's SPD editor node supplies the settings, see :func:`configure_editor`). ``mode``: "set" replaces the
    segment inside the editable area (only on ``slices`` = (axis, slice numbers) when given, see
    :func:`modification_steps`), "add" and "remove" as the Paint and Erase effects. The state before the write
    is saved for undo (:func:`save_state_for_undo`) unless ``save_undo`` is False (the caller saved it already).
    """
    steps = modification_steps(mask, mode, slices)
    editor_node, segmentation_node, segment_id = _resolve_target(target)
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"Segment {segment_id!r} is not in {segmentation_node.GetName()!r}.")
    logic = editor_logic or editor_logic_for(editor_node)
    if logic.GetSegmentEditorNode() is not editor_node:
        logic.SetSegmentEditorNode(editor_node)
    reference = logic.GetReferenceImageGeometryString()
    if not reference:  # no source volume and no reference geometry yet: the mask's grid becomes the reference
        import slicer

        own = modifier_labelmap(mask, geometry, segmentation_node)
        reference = slicer.vtkSegmentationConverter.SerializeImageGeometry(own)
        segmentation_node.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), reference)
    if segmentation_node.GetSegmentation().GetSourceRepresentationName() != "Binary labelmap":
        if not logic.SetSourceRepresentationToBinaryLabelMap():
            raise InputError(f"{segmentation_node.GetName()!r} cannot be converted to a binary labelmap.")
    kept_by = save_state_for_undo(segmentation_node, logic) if save_undo else None
    flags = {"set": logic.ModificationModeSet, "add": logic.ModificationModeAdd,
             "remove": logic.ModificationModeRemove}
    for array, step_mode in steps:
        modifier = modifier_labelmap(array, geometry, segmentation_node, reference)
        logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, flags[step_mode], False, False)
    if kept_by is not None:
        wrote(segmentation_node, kept_by)
    return segment_id


# ---------------------------------------------------------------- undo: the Segment Editor's own

def segment_editor_widget():
    """The Segment Editor module's editor widget (``qMRMLSegmentEditorWidget``) in desktop Slicer, created if it is
    not yet; None without Slicer's GUI (slicer-core, PythonSlicer). Its logic keeps the Segment Editor's undo
    states (``vtkSegmentationHistory``, private to it): its ``saveStateForUndo()`` and ``undo()`` slots reach them."""
    try:
        import slicer

        representation = slicer.modules.segmenteditor.widgetRepresentation()
    except (ImportError, AttributeError):
        return None
    return getattr(representation.self(), "editor", None) if representation is not None else None


def save_state_for_undo(segmentation_node, logic):
    """Save ``segmentation_node``'s state before an SPD write where its undo is kept.

    In desktop Slicer that is the Segment Editor (its widget is switched to this segmentation if it shows another,
    as choosing it there would): its Undo then reverts the write, one step per write, in order with every other
    edit. Elsewhere it is ``logic``'s own history, returned so that :func:`wrote` can record what SPD wrote and
    :func:`undo` never reverts an edit made after it. Returns None when the Segment Editor keeps it.
    """
    widget = segment_editor_widget()
    if widget is not None:
        shown = widget.segmentationNode()
        if shown is None or shown.GetID() != segmentation_node.GetID():
            widget.setSegmentationNode(segmentation_node)
        widget.saveStateForUndo()
        return None
    logic.SaveStateForUndo()
    return logic


def wrote(segmentation_node, kept_by) -> None:
    """Record the segmentation's content after an SPD write whose undo state ``kept_by`` (an editor logic) holds."""
    if kept_by is None:
        return
    scene = segmentation_node.GetScene()
    key = segmentation_node.GetAddressAsString("vtkObject")
    owner, stamps = _STAMPS_AFTER_WRITE.get(key, (scene.GetAddressAsString("vtkObject") if scene else None, []))
    _STAMPS_AFTER_WRITE[key] = (owner, (stamps + [content_stamp(segmentation_node)])[-MAX_UNDO_STATES:])


def content_stamp(segmentation_node) -> str:
    """A digest of every segment's id, label value and source-representation voxels (a labelmap shared by several
    segments is read once): equal stamps mean equal segmentations, byte for byte."""
    import hashlib

    from vtk.util import numpy_support

    digest = hashlib.blake2b(digest_size=16)
    segmentation = segmentation_node.GetSegmentation()
    layers: Dict[str, bytes] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        digest.update(f"{segment_id}\0{segment.GetLabelValue()}\0".encode())
        layer = segment.GetRepresentation(segmentation.GetSourceRepresentationName())
        if layer is None:
            continue
        address = layer.GetAddressAsString("vtkObject")
        if address not in layers:
            layer_digest = hashlib.blake2b(repr(layer.GetBounds()).encode(), digest_size=16)
            if layer.IsA("vtkImageData"):
                layer_digest.update(repr(layer.GetExtent()).encode())
                scalars = layer.GetPointData().GetScalars()
                if scalars is not None:
                    layer_digest.update(np.ascontiguousarray(numpy_support.vtk_to_numpy(scalars)).tobytes())
            else:  # a closed surface: its MTime stands in for its points
                layer_digest.update(str(layer.GetMTime()).encode())
            layers[address] = layer_digest.digest()
        digest.update(layers[address])
    return digest.hexdigest()


def _watch(segmentation, action) -> bool:
    """Run ``action``; True if it added, removed or modified a segment of ``segmentation``."""
    seen = []
    tags = [segmentation.AddObserver(event, lambda caller, event_id: seen.append(event_id))
            for event in (segmentation.SegmentAdded, segmentation.SegmentRemoved, segmentation.SegmentModified)]
    try:
        action()
    finally:
        for tag in tags:
            segmentation.RemoveObserver(tag)
    return bool(seen)


def undo(target) -> bool:
    """Undo the last edit of a segmentation that SPD wrote: True if one was undone, False if there is none.

    ``target``: a segmentation node, a segment editor node, or (segmentation node, segment id, source volume).
    In desktop Slicer this is the Segment Editor's Undo (the same as its Undo button: the last edit of that
    segmentation, whichever tool made it). Elsewhere SPD's own history is used, and only while nothing changed
    the segmentation since SPD's last write there: undoing then would also revert those changes, so an
    InputError says so and nothing is undone.
    """
    if hasattr(target, "GetSegmentation"):
        segmentation_node, editor_node = target, None
    elif hasattr(target, "GetMaskMode"):
        segmentation_node, editor_node = target.GetSegmentationNode(), target
    else:
        editor_node, segmentation_node, _ = _resolve_target(target)
    if segmentation_node is None:
        return False
    widget = segment_editor_widget()
    if widget is not None:
        shown = widget.segmentationNode()
        if shown is None or shown.GetID() != segmentation_node.GetID():
            return False  # its undo states are of another segmentation (switching clears them)
        return _watch(segmentation_node.GetSegmentation(), widget.undo)
    logic = editor_logic_for(editor_node or spd_editor_node(segmentation_node.GetScene()))
    if logic.GetSegmentEditorNode().GetSegmentationNode() is not segmentation_node or not logic.CanUndo():
        return False
    key = segmentation_node.GetAddressAsString("vtkObject")
    stamps = _STAMPS_AFTER_WRITE.get(key, (None, []))[1]
    if not stamps:
        return False
    if content_stamp(segmentation_node) != stamps[-1]:
        raise InputError(f"{segmentation_node.GetName()!r} was edited after SPD's last write; undoing that write "
                         "now would also undo those edits. Undo them first with the tool that made them (the "
                         "Segment Editor's Undo).")
    stamps.pop()
    logic.Undo()
    return True


def add_segment(segmentation_node, name: str, color: Optional[Sequence[float]] = None) -> str:
    """A new empty segment (unique id, given name); returns its id."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.AddEmptySegment("", name)
    if color is not None:
        segmentation.GetSegment(segment_id).SetColor(*[float(c) for c in color])
    return segment_id


# ---------------------------------------------------------------- a run on nodes

def prepare_inputs(volume_node, markups_node, axis=None, model=None):
    """(Volume, VoxelPrompts) from MRML nodes. Call on the main thread; the rest can run in a worker.

    ``axis``: None or "auto" chooses from the points, preferring the orientations ``model`` (name, path or
    loaded; None: the default model) was trained on; an axis from :func:`axis_from_slice_to_ras` keeps its
    source "view"; a name or 0/1/2 is "given".
    """
    from ..core.prompts import to_voxels

    volume = volume_from_node(volume_node)
    points = points_from_markups(markups_node)
    preferred = ()
    if axis is None or (isinstance(axis, str) and axis.strip().lower() == "auto"):
        from ..core.pipeline import trained_axes

        preferred = trained_axes(model, volume)
    return volume, to_voxels(points, volume, axis=axis, preferred_axes=preferred)


def run_spd_on_nodes(volume_node, markups_node, segmentation_node, segment_id: Optional[str] = None,
                     model: Any = None, options=None, progress=None,
                     segment_fn: Optional[Callable[..., Any]] = None, editor_node=None, axis=None,
                     device: str = "auto", overwrite: Optional[str] = None, editable_area: Optional[str] = None):
    """Segment from the points of ``markups_node`` and write into a segment; returns the pipeline Result.

    Console use: ``run_spd_on_nodes(volume, points, segmentation)`` creates a segment named after the
    point list. ``model`` is a model name / checkpoint path (loaded with ``pipeline.load_model``; None is
    the default SPD model) or a loaded model. ``segment_fn(volume, prompts, model, options=...,
    progress=...)`` replaces ``pipeline.segment`` (tests). The segment is created and written only after
    the run succeeded, and only where the run ran (its decoded slices; the segment keeps its content
    elsewhere). ``overwrite`` and ``editable_area`` are the Segment Editor's masking (:func:`configure_editor`;
    default: other segments untouched, everywhere editable); with ``editor_node`` that node's own settings
    apply instead. One undo reverts the write (:func:`undo`). A failed or cancelled run raises and leaves the
    segmentation unchanged.
    """
    from ..core.pipeline import SegmentOptions

    options = (options or SegmentOptions()).validate()  # a bad option is refused before any model loads
    if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"Segment {segment_id!r} is not in {segmentation_node.GetName()!r}.")
    _check_write_settings(editor_node, overwrite, editable_area)
    volume, voxel_prompts = prepare_inputs(volume_node, markups_node, axis=axis, model=model)
    validate_array(volume.array, what=f"volume {volume.name!r}")  # the console waits anyway; the engine checks its own
    if segment_fn is None:
        from ..core import pipeline

        segment_fn = pipeline.segment
        if model is None or isinstance(model, str):
            model = pipeline.load_model(model or pipeline.DEFAULT_MODEL, device=device)
    result = segment_fn(volume, voxel_prompts, model, options=options, progress=progress)
    if progress is not None:
        progress.check()  # a cancel that arrived after the last slice still writes nothing
    write_result(result, volume, volume_node, segmentation_node, segment_id,
                 segment_name=markups_node.GetName() or "SPD", editor_node=editor_node, overwrite=overwrite,
                 editable_area=editable_area)
    return result


def _check_write_settings(editor_node, overwrite, editable_area) -> None:
    if editor_node is not None and (overwrite is not None or editable_area is not None):
        raise InputError("Give either a segment editor node (its masking settings are used) or the settings "
                         "(overwrite, editable_area), not both.", setting="overwrite")
    if overwrite is not None:
        _check_choice(overwrite, OVERWRITE_CHOICES, "overwrite")
    if editable_area is not None:  # "inside one segment" needs a segment: a segment editor node set to it
        _check_choice(editable_area, EDITABLE_AREAS[:-1], "editable_area")


def write_result(result, volume: Volume, volume_node, segmentation_node, segment_id: Optional[str] = None,
                 segment_name: str = "SPD", editor_node=None, overwrite: Optional[str] = None,
                 editable_area: Optional[str] = None) -> str:
    """Write a finished run's mask into ``segment_id`` (a new segment ``segment_name`` if None); its id.

    Call on the main thread after the run succeeded. Only the slices where the run ran change
    (:func:`ran_on`; a bare mask writes everywhere). The masking is ``editor_node``'s, or ``overwrite`` and
    ``editable_area`` on the scene's SPD editor node (defaults: other segments untouched, everywhere). A new
    segment and its contents go in one undo step (:func:`save_state_for_undo`).
    """
    mask = np.asarray(getattr(result, "mask", result))
    if mask.shape != volume.shape:
        raise InputError(f"The result mask has shape {mask.shape}, the volume {volume.shape}.")
    if segment_id is not None and segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"Segment {segment_id!r} is not in {segmentation_node.GetName()!r}.")
    _check_write_settings(editor_node, overwrite, editable_area)
    if editor_node is None:
        editor_node = spd_editor_node(segmentation_node.GetScene())
        configure_editor(editor_node, overwrite or DEFAULT_OVERWRITE, editable_area or DEFAULT_EDITABLE_AREA)
    editor_node.SetAndObserveSegmentationNode(segmentation_node)
    editor_node.SetAndObserveSourceVolumeNode(volume_node)
    logic = editor_logic_for(editor_node)
    kept_by = save_state_for_undo(segmentation_node, logic)  # before a new segment: one step removes both
    if segment_id is None:
        segment_id = add_segment(segmentation_node, segment_name)
    editor_node.SetSelectedSegmentID(segment_id)
    apply_mask_to_segment(editor_node, mask, volume, editor_logic=logic, save_undo=False,
                          slices=ran_on(result) if hasattr(result, "mask") else None)
    wrote(segmentation_node, kept_by)
    return segment_id


def axis_from_slice_to_ras(slice_to_ras, volume: Volume):
    """The array axis of ``volume`` whose slices a slice view with this SliceToRAS matrix shows.

    The view's normal (third column, world RAS) is matched against the volume's i, j, k directions, so any
    view works (Red, Green, Yellow, or a reformatted one), not only the axial one. The axis is a
    ``prompts.AxisChoice`` with source "view": passed to ``to_voxels``, the run's ``axis_note`` says so.
    """
    from ..core.prompts import AxisChoice

    normal = np.asarray(slice_to_ras, float)[:3, 2]
    directions = volume.ijk_to_ras[:3, :3] / np.linalg.norm(volume.ijk_to_ras[:3, :3], axis=0)
    ijk_index = int(np.argmax(np.abs(directions.T @ (normal / np.linalg.norm(normal)))))
    return AxisChoice(2 - ijk_index, "view")


# ---------------------------------------------------------------- result overlays

def saliency_to_volume_node(saliency, geometry, scene, name: str = "SPD saliency", node=None):
    """A scalar volume node showing the saliency map (float 0..1 on the volume grid)."""
    import vtk
    from vtk.util import numpy_support

    saliency = getattr(saliency, "saliency", saliency)
    if saliency is None:
        raise InputError("This run produced no saliency map (raw mode); run in SPD mode to see it.")
    saliency = np.ascontiguousarray(saliency, dtype=np.float32)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(saliency.shape[2], saliency.shape[1], saliency.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(saliency.ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_vtk_matrix(LPS_TO_RAS @ _geometry(geometry)))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(1.0, 0.5)
        for colour_id in SALIENCY_COLOUR_NODE_IDS:
            if scene.GetNodeByID(colour_id) is not None:
                display.SetAndObserveColorNodeID(colour_id)
                break
    return node


def audit_to_markups_nodes(audit, geometry, scene, nodes=None, axis: Optional[int] = None) -> Dict[str, Any]:
    """Locked point lists: kept (green), rejected (red), borrowed (yellow) consensus prompts, and the user's
    corrections (blue; described "background" or "foreground correction").

    ``audit`` is a Result (its axis is used) or a list of AuditEntry; ``nodes`` (from an earlier call) are
    refilled instead of adding new ones.
    """
    axis = getattr(audit, "axis", axis)
    audit = getattr(audit, "audit", audit) or []
    if audit and axis is None:
        raise InputError("Audit entries hold in-slice (row, col) positions; pass the run's slicing axis.")
    matrix = _geometry(geometry)
    nodes = dict(nodes or {})
    for status, colour in AUDIT_COLOURS.items():
        node = nodes.get(status)
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{AUDIT_NODE_NAME} {status}")
            node.CreateDefaultDisplayNodes()
            nodes[status] = node
        was_modifying = node.StartModify()
        node.RemoveAllControlPoints()
        display = node.GetDisplayNode()
        if display is not None:
            display.SetColor(*colour)
            display.SetSelectedColor(*colour)
            display.SetPointLabelsVisibility(False)
        entries = [e for e in audit if e.status == status]
        if entries:
            lps = ijk_to_physical(np.array([e.ijk(axis) for e in entries]), matrix)
            for entry, point in zip(entries, lps * np.array([-1.0, -1.0, 1.0])):
                index = node.AddControlPoint([float(v) for v in point], f"{status[0]}{entry.slice}")
                if entry.source_slice != entry.slice:
                    node.SetNthControlPointDescription(index, f"from slice {entry.source_slice}")
                elif status == "correction":
                    node.SetNthControlPointDescription(index, "foreground correction" if entry.label else "background")
        node.SetLocked(True)
        node.EndModify(was_modifying)
    return nodes


# ---------------------------------------------------------------- the application

def slicer_python() -> str:
    """Slicer's own Python (``PythonSlicer``), found as Slicer's Python utilities find it: on the PATH
    that Slicer sets, else in ``<slicerHome>/bin``; outside Slicer, this interpreter."""
    import shutil
    import sys

    found = shutil.which("PythonSlicer")
    if found:
        return found
    try:
        import slicer

        home = str(slicer.app.slicerHome)
    except (ImportError, AttributeError):
        return sys.executable
    candidate = os.path.join(home, "bin", "PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return candidate if os.path.isfile(candidate) else sys.executable


def startup_environment() -> Optional[Dict[str, str]]:
    """The environment Slicer started with (what ``slicer.util.launchConsoleProcess`` gives a child);
    None outside Slicer (the child inherits this process's)."""
    try:
        import slicer

        environment = slicer.util.startupEnvironment()
    except (ImportError, AttributeError):
        return None
    return dict(environment) if isinstance(environment, dict) else None


SETTINGS_PREFIX = "SPDSEGMENT_"  # SPD's settings are environment variables (README: SPDSEGMENT_RUNTIME, ...)


def engine_environment() -> Dict[str, str]:
    """The SPD engine's environment: Slicer's startup environment (so that ``PythonSlicer`` sets up its
    own), with SPD's settings as they are in this Slicer now: every ``SPDSEGMENT_*`` variable of
    ``os.environ``, so one set in Slicer's Python console reaches the next engine, and Slicer's cache
    folder (:func:`use_slicer_cache_folder`). Called at each engine start."""
    use_slicer_cache_folder()
    base = startup_environment()
    base = dict(os.environ) if base is None else base
    environment = {k: v for k, v in base.items() if not k.startswith(SETTINGS_PREFIX)}
    environment.update({k: v for k, v in os.environ.items() if k.startswith(SETTINGS_PREFIX)})
    return environment


def slicer_cache_folder() -> Optional[str]:
    """Slicer's cache folder (Application Settings > Cache, ``slicer.app.cachePath``); None outside Slicer."""
    try:
        import slicer

        folder = slicer.app.cachePath
    except (ImportError, AttributeError):
        return None
    return str(folder) if folder else None


def use_slicer_cache_folder() -> Optional[str]:
    """In Slicer, SPD's cache (downloads, converted models, the training feature store, logs) goes into
    Slicer's cache folder, unless ``SPDSEGMENT_CACHE`` names another: the rule is
    ``core.models.download.cache_dir``; this tells it where Slicer's cache folder is, in this process and
    (through the environment) in every process it starts. Returns that folder (None outside Slicer)."""
    from ..core.models.download import HOST_CACHE_ENV

    folder = slicer_cache_folder()
    if folder:
        os.environ[HOST_CACHE_ENV] = folder
    return folder


def on_scene_closed(callback: Callable[[], Any], scene=None) -> None:
    """Call ``callback`` each time ``scene`` has been closed (its EndCloseEvent, which File > Close Scene and
    ``scene.Clear()`` send); registered once per scene and callback. Without ``scene``: desktop Slicer's
    scene, which lives as long as Slicer (nothing elsewhere). A watched scene is held until
    :func:`stop_watching_scenes` removes its observers (at Slicer's exit; after each test): a scene destroyed
    by Python's garbage collector sends its close events from inside the collector, and a Python observer
    called there crashes VTK."""
    if scene is None:
        if slicer_version() is None:
            return
        import slicer

        scene = slicer.mrmlScene
    if any(known_scene is scene and known == callback for known_scene, known, _ in _SCENE_WATCHERS):
        return
    tag = scene.AddObserver(scene.EndCloseEvent, lambda caller, event: callback())
    _SCENE_WATCHERS.append((scene, callback, tag))


def stop_watching_scenes() -> None:
    """Remove every :func:`on_scene_closed` observer and let the scenes go."""
    for scene, _, tag in _SCENE_WATCHERS:
        scene.RemoveObserver(tag)
    _SCENE_WATCHERS.clear()


_SCENE_WATCHERS: list = []  # (scene, callback, observer tag): the scene is held while it is watched


def on_application_exit(callback: Callable[[], Any]) -> None:
    """Call ``callback`` when Slicer quits (nothing outside Slicer; ``atexit`` covers that)."""
    try:
        import slicer

        slicer.app.connect("aboutToQuit()", callback)
    except (ImportError, AttributeError):
        pass


def check_slicer_version(version: Optional[tuple] = None) -> None:
    """Refuse to start a run in a Slicer older than :data:`MINIMUM_SLICER` (before any work is done)."""
    version = slicer_version() if version is None else version
    if version is not None and tuple(version) < MINIMUM_SLICER:
        raise InputError("SPDSegment needs Slicer {}.{} or later; this is Slicer {}.{}. Install a newer Slicer."
                         .format(*MINIMUM_SLICER, *version))


def slicer_version() -> Optional[tuple]:
    """(major, minor) of the running Slicer; None outside desktop Slicer."""
    try:
        import slicer

        version = (slicer.app.majorVersion, slicer.app.minorVersion)
    except (ImportError, AttributeError):
        return None
    return version if all(isinstance(v, int) for v in version) else None
