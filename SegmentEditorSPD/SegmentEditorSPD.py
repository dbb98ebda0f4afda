"""Hidden module that registers the SPD effect in the Segment Editor at application startup."""
import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

EFFECT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "SegmentEditorSPDLib",
                             "SegmentEditorEffect.py")


class SegmentEditorSPD(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SegmentEditorSPD"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SPDSegment developers (SPDSegment project)"]
        self.parent.hidden = True
        self.parent.helpText = "Registers the SPD effect (sloppy points -> segmentation) in the Segment Editor."
        self.parent.acknowledgementText = "See the SPD Segment module."
        slicer.app.connect("startupCompleted()", registerEffect)


def registerEffect():
    """Add the SPD scripted effect to the segment editor effect factory (idempotent)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
    if any(effect.name == "SPD" for effect in getattr(factory, "registeredEffects", list)()):
        return
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    instance.self().register()


class SegmentEditorSPDTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_EffectRegistered()

    def test_EffectRegistered(self):
        registerEffect()
        names = [effect.name for effect in slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()]
        self.assertIn("SPD", names)
        self.delayDisplay("SPD effect registered")
