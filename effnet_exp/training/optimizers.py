"""The optimizers of `conf/optimizer/`, as tf.compat.v1.train optimizers."""
import tensorflow as tf

from effnet_exp.training.config import OptimizerName


def build_optimizer(opt_cfg, learning_rate):
    name = OptimizerName(opt_cfg.name)
    train = tf.compat.v1.train
    if name == OptimizerName.sgd_nesterov:
        return train.MomentumOptimizer(learning_rate, opt_cfg.momentum, use_nesterov=True)
    if name == OptimizerName.momentum:
        return train.MomentumOptimizer(learning_rate, opt_cfg.momentum, use_nesterov=opt_cfg.nesterov)
    if name == OptimizerName.rmsprop:
        return train.RMSPropOptimizer(learning_rate, decay=opt_cfg.decay, momentum=opt_cfg.momentum,
                                      epsilon=opt_cfg.epsilon)
    if name == OptimizerName.adam:
        return train.AdamOptimizer(learning_rate, beta1=opt_cfg.beta1, beta2=opt_cfg.beta2, epsilon=opt_cfg.epsilon)
    return train.GradientDescentOptimizer(learning_rate)
