"""What the channel analysis finds: groups of channels that must be pruned together, and the weight
slices that carry them (the data `channel_graph.analyse` builds and `apply` uses)."""

from dataclasses import dataclass, field

import numpy as np
import onnx


@dataclass
class Slice:
    """Cut `initializer` along `axis` where `channel_map` positions are pruned."""
    initializer: str
    axis: int
    channel_map: np.ndarray  # int64 [positions, 2]: (group, index) or (-1, -1)
    role: str  # "out": a producer's output channels, "in": a consumer's input channels, "param": per-channel


@dataclass
class Group:
    size: int
    layer: str  # the node that produced the channels
    op_type: str


@dataclass
class ChannelGraph:
    model: onnx.ModelProto
    groups: list[Group]
    parent: list[int]  # union-find over groups: tied groups share a root
    blocked: dict[int, str]  # root group -> why it cannot be pruned
    slices: list[Slice]
    depthwise: dict[str, np.ndarray] = field(default_factory=dict)  # node name -> its input map
    reshapes: dict[str, tuple[str, np.ndarray, int]] = field(default_factory=dict)  # shape initializer -> (node, map, spatial)

    def root(self, group: int) -> int:
        while self.parent[group] != group:
            self.parent[group] = self.parent[self.parent[group]]
            group = self.parent[group]
        return group

    def prunable(self) -> list[int]:
        """Root groups that may lose channels."""
        roots = sorted({self.root(g) for g in range(len(self.groups))})
        return [r for r in roots if r not in self.blocked and self.groups[r].size > 1]

    def members(self, root: int) -> list[int]:
        return [g for g in range(len(self.groups)) if self.root(g) == root]

    def layers(self, root: int) -> list[str]:
        return [self.groups[g].layer for g in self.members(root)]
