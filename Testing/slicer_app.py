"""A scene wired like desktop Slicer's, on the slicer-core wheel (no Qt), for the MRML tests.

Desktop Slicer creates the application logic and the module logics at startup; in plain Python we
wire the ones SPD needs: colours, volumes, markups, segmentations and a segment editor node + logic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from SPDSegmentLib.core.errors import InputError
from SPDSegmentLib.slicer_side.adapter import editor_logic_for, on_scene_closed, release_editor_logics


@dataclass
class StandaloneApp:
    scene: Any
    app_logic: Any
    volumes_logic: Any
    markups_logic: Any
    segmentations_logic: Any
    editor_node: Any
    editor_logic: Any

    def load_volume(self, path, name: Optional[str] = None):
        node = self.volumes_logic.AddArchetypeVolume(str(path), name or _stem(path), 0)
        if node is None:
            raise InputError(f"Could not load volume {path}.")
        return node

    def load_markups(self, path):
        node_id = self.markups_logic.LoadMarkups(str(path), _stem(path))
        node = self.scene.GetNodeByID(node_id) if isinstance(node_id, str) else node_id
        if node is None:
            raise InputError(f"Could not load markups {path}.")
        return node

    def new_segmentation(self, reference_volume_node=None, name: str = "Segmentation"):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        if reference_volume_node is not None:
            node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        return node


def _stem(path) -> str:
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".seg.nrrd", ".mrk.json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0]


def make_standalone_app() -> StandaloneApp:
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colour_logic = app_logic.GetColorLogic()
    colour_logic.SetMRMLScene(scene)
    colour_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", colour_logic)

    def module_logic(cls, name):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        return logic

    volumes = module_logic(slicer.vtkSlicerVolumesLogic, "Volumes")
    markups = module_logic(slicer.vtkSlicerMarkupsLogic, "Markups")
    segmentations = module_logic(slicer.vtkSlicerSegmentationsModuleLogic, "Segmentations")
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "SegmentEditor")
    editor_logic = editor_logic_for(editor_node)
    on_scene_closed(release_editor_logics, scene)  # as on desktop Slicer's scene; conftest stops watching
    editor_logic.SetMRMLApplicationLogic(app_logic)
    return StandaloneApp(scene, app_logic, volumes, markups, segmentations, editor_node, editor_logic)
