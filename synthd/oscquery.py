"""synthd's OSC address space as an OSCQuery namespace (Vidvox's OSCQuery proposal).

`namespace(surface, host)` describes every address synthd takes as a tree of nodes with the
proposal's attributes: FULL_PATH, CONTENTS, TYPE (OSC type tags), VALUE, RANGE, ACCESS
(1 read, 2 write, 3 both), DESCRIPTION, UNIT, CLIPMODE. `node(tree, path)` finds one node,
`host_info(...)` answers `?HOST_INFO`. Pure functions of the surface's state: synthd.web
serves them.
"""

from __future__ import annotations

from typing import Any

from synthd.controls import GAIN_RANGE_DB, ControlSurface
from synthd.osc import PREFIX

READ, WRITE, READ_WRITE = 1, 2, 3
ATTRIBUTES = ("FULL_PATH", "CONTENTS", "TYPE", "VALUE", "RANGE", "ACCESS", "DESCRIPTION", "UNIT", "CLIPMODE")

# what a control's label source says about it, in words
SOURCES = {
    "attribute": "named for the sound descriptor it was measured to move",
    "pca": "a direction of the model's latent space, unnamed (none measured clearly), by importance",
    "f0": "the pitch input: the note played, in MIDI note units",
    "voicing": "how much of the sound is the harmonic (pitched) part",
    "fallback": "a latent dimension of a file without metadata",
}


def describe(label: str, source: str, lo: float, hi: float, unit: str | None, model: str) -> str:
    """A control's DESCRIPTION: what it does, how its name was found, and its model range."""
    kind = source.split(":", 1)[-1]
    meaning = SOURCES.get(kind, f"labelled by {source}")
    units = f" {unit}" if unit else ""
    return f"{label} of {model}: {meaning}; 0..1 covers {lo:g}..{hi:g}{units}"


def _leaf(path: str, types: str, access: int, description: str, value: list | None = None,
          ranges: list | None = None, unit: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"FULL_PATH": path, "ACCESS": access, "DESCRIPTION": description}
    if types:
        out["TYPE"] = types
    if value is not None:
        out["VALUE"] = value
    if ranges is not None:
        out["RANGE"] = ranges
        out["CLIPMODE"] = "both"
    if unit is not None:
        out["UNIT"] = unit
    return out


def _branch(path: str, description: str, contents: dict[str, dict]) -> dict[str, Any]:
    return {"FULL_PATH": path, "ACCESS": 0, "DESCRIPTION": description, "CONTENTS": contents}


def namespace(surface: ControlSurface) -> dict[str, Any]:
    """The whole tree, from the root `/`."""
    model = surface.engine.model
    controls, latents = {}, {}
    for c in surface.controls:
        info = c.info
        text = describe(info.label, info.source, info.minimum, info.maximum, info.unit, model.name)
        node = _leaf(f"{PREFIX}/control/{info.label}", "f", READ_WRITE, text, [c.wire], [{"MIN": 0.0, "MAX": 1.0}])
        controls[info.label] = node
        latents[str(info.index)] = {**node, "FULL_PATH": f"{PREFIX}/latent/{info.index}",
                                    "DESCRIPTION": f"control {info.index} ({info.label}) by its decode input"}
    presets = [p.name for p in surface.patch.presets]
    preset_range = [{"VALS": presets}] if presets else None
    labels = [c.info.label for c in surface.controls]
    synthd = {
        "control": _branch(f"{PREFIX}/control", f"the controls of {model.name}, by label (wire values 0..1)",
                           controls),
        "latent": _branch(f"{PREFIX}/latent", "the same controls by decode input, 0 the most important", latents),
        "gain": _leaf(f"{PREFIX}/gain", "f", READ_WRITE, "output gain", [surface.gain_db],
                      [{"MIN": GAIN_RANGE_DB[0], "MAX": GAIN_RANGE_DB[1]}], ["gain.dB"]),
        "gate": _leaf(f"{PREFIX}/gate", "i", READ_WRITE, "1 opens the gate (sound), 0 closes it",
                      [int(surface.gate_open)], [{"MIN": 0, "MAX": 1}]),
        "note": _leaf(f"{PREFIX}/note", "ii", WRITE, "play a note: number 0..127, velocity 1..127 (0 releases)",
                      None, [{"MIN": 0, "MAX": 127}, {"MIN": 0, "MAX": 127}]),
        "status": _leaf(f"{PREFIX}/status", "", WRITE, "answers /synthd/status.reply (see the README)"),
        "controls": _leaf(f"{PREFIX}/controls", "", WRITE, "answers one /synthd/controls.reply per control"),
        "model": _branch(f"{PREFIX}/model", "models", {
            "load": _leaf(f"{PREFIX}/model/load", "s", WRITE, "crossfade to a model of the model folder, by name")}),
        "patch": _branch(f"{PREFIX}/patch", "patches", {
            "load": _leaf(f"{PREFIX}/patch/load", "s", WRITE, "load a patch of the patch folder, by name"),
            "save": _leaf(f"{PREFIX}/patch/save", "", WRITE, "write learned mappings and presets to the patch")}),
        "learn": _leaf(f"{PREFIX}/learn", "s", WRITE, "MIDI learn: the next CC moved drives this control",
                       None, [{"VALS": labels}]),
        "preset": _branch(f"{PREFIX}/preset", f"presets of patch {surface.patch.name}", {
            "save": _leaf(f"{PREFIX}/preset/save", "s", WRITE, "store the current values as a preset"),
            "recall": _leaf(f"{PREFIX}/preset/recall", "s", WRITE, "glide to a preset", None, preset_range)}),
        "notify": _leaf(f"{PREFIX}/notify", "i", WRITE, "1: this UDP client receives every value change"),
        "replyport": _leaf(f"{PREFIX}/replyport", "i", WRITE, "send this UDP client's replies to this port"),
        "quit": _leaf(f"{PREFIX}/quit", "", WRITE, "fade out and stop synthd"),
    }
    root = _branch("/", f"synthd playing {model.name}", {"synthd": _branch(PREFIX, "synthd", synthd)})
    return root


def node(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The node at `path` ("/", "/synthd/gain", ...), None when there is none."""
    current = tree
    for part in [p for p in path.split("/") if p]:
        contents = current.get("CONTENTS")
        if not contents or part not in contents:
            return None
        current = contents[part]
    return current


def leaves(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node with a VALUE: what a client may LISTEN to."""
    out = []
    stack = [tree]
    while stack:
        n = stack.pop()
        if "VALUE" in n:
            out.append(n)
        stack.extend(n.get("CONTENTS", {}).values())
    return out


def host_info(name: str, osc_host: str, osc_port: int, ws_host: str, ws_port: int) -> dict[str, Any]:
    """The `?HOST_INFO` answer: where OSC goes, and which parts of the proposal synthd serves."""
    return {
        "NAME": name, "OSC_IP": osc_host, "OSC_PORT": osc_port, "OSC_TRANSPORT": "UDP",
        "WS_IP": ws_host, "WS_PORT": ws_port,
        "EXTENSIONS": {"ACCESS": True, "VALUE": True, "RANGE": True, "DESCRIPTION": True, "UNIT": True,
                       "CLIPMODE": True, "TAGS": False, "EXTENDED_TYPE": False, "CRITICAL": False,
                       "OVERLOADS": False, "LISTEN": True, "PATH_CHANGED": True, "PATH_ADDED": False,
                       "PATH_REMOVED": False, "PATH_RENAMED": False, "HTML": True},
    }
