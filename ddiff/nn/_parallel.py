"""Tensor parallelism in the Megatron layout (Shoeybi et al. 2019), as a layer declares it:
which of its linear layers the trainer splits over the ``model`` axis of its mesh, and a
sharding constraint for what a declaration cannot say."""

import abc
import dataclasses

import equinox as eqx
import jax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Shaped

from ddiff._sharding import MODEL


@dataclasses.dataclass(frozen=True)
class TensorSplit:
    """The Megatron layout of one layer, by the names of its ``eqx.nn.Linear`` fields.

    A column-parallel layer y = x W^T + b has its output features split: each device along
    ``model`` holds rows of W (and the matching entries of b) and computes its slice of y.
    A row-parallel layer has its input features split: each device holds columns of W,
    multiplies its slice of x, and one all-reduce sums the partial products (b is whole,
    added once). Column then row (q, k, v then the output projection; w1, w3 then w2)
    costs one all-reduce in the forward pass and one in the backward pass, and every
    position-wise operation between them (rotary positions, attention per head, the gate)
    runs on each device's own heads or hidden units.

    Attributes:
        column: the fields split along their output features.
        row: the fields split along their input features.
        heads: attention heads (0: none), which must divide by the model axis.
        heads_key: the network's recipe key that sets ``heads`` (named when they do not
            divide).
    """

    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    heads: int = 0
    heads_key: str = "heads"


class AbstractTensorParallel(eqx.Module):
    """A layer whose weights tensor parallelism splits over the ``model`` mesh axis, as
    :meth:`tensor_split` declares; every other array of the layer is whole on every model
    device. Under a :class:`ddiff.nn.LayerStack` the declared dimensions are those of one
    layer (the trainer adds the layer axis). Nothing changes in how the layer computes:
    the trainer places its parameters split and the compiler partitions the products."""

    @abc.abstractmethod
    def tensor_split(self) -> TensorSplit:
        """The layer's Megatron layout.

        Returns:
            Which linear fields are column- and row-parallel, and the layer's heads.
        """


def split_over_model(x: Shaped[Array, "..."], axis: int) -> Shaped[Array, "..."]:
    """``x`` constrained to be split over the ``model`` mesh axis along ``axis`` (and whole
    along every other dimension): where a layer's split cannot be declared on a stored
    weight (the heads of a fused q/k/v projection, whose three blocks of rows are not one
    contiguous split), a constraint on a view of it tells the compiler which part each
    model device computes. The identity outside a mesh with a ``model`` axis of more than
    one device left to the compiler."""
    mesh = jax.sharding.get_abstract_mesh()
    if MODEL not in mesh.axis_names or mesh.shape[MODEL] == 1:
        return x
    if mesh.axis_types[mesh.axis_names.index(MODEL)] == AxisType.Manual:
        return x
    spec = [None] * x.ndim
    spec[axis] = MODEL
    return jax.lax.with_sharding_constraint(x, P(*spec))
