"""Graph pieces of Ascend data parallelism and device loops, through npu_bridge (imported lazily)."""
import tensorflow as tf

from effnet_exp.optional import npu


def broadcast_variables_op(root_rank=0):
    """Assigns every float global variable (weights, batch-norm statistics, optimizer slots, moving averages,
    the loss scale) and the global step the value they have on root_rank, with HCCL's broadcast."""
    hccl_ops = npu("hccl_ops")
    assigns = []
    with tf.name_scope("broadcast_from_rank_{}".format(root_rank)):
        for var in tf.compat.v1.global_variables():
            if not (var.dtype.base_dtype.is_floating or var.op.name == "global_step"):
                continue
            outputs = hccl_ops.broadcast(tensor=[var], root_rank=root_rank)
            if outputs:
                assigns.append(tf.compat.v1.assign(var, outputs[0]))
    return tf.group(*assigns, name="broadcast_variables")


class DeviceLoop(object):
    """device.iterations_per_loop > 1: each sess.run of train_op runs that many steps on the NPU (npu_bridge's
    IterationPerLoop: its loop variables are created with the graph and loaded once the session exists)."""

    def __init__(self, train_op, iterations):
        self.iterations = int(iterations)
        self.helper = None
        self.train_op = train_op
        if self.iterations > 1:
            self.helper = npu("util").IterationPerLoop()
            self.train_op = self.helper.create_iteration_per_loop_var(train_op)

    def load(self, sess):
        if self.helper is not None:
            self.helper.load_iteration_per_loop_var(sess, self.iterations)
