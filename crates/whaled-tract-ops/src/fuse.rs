//! Element-wise steps that follow a convolution and are fused into whaled's conv ops: the ReLU
//! (`Max 0`) and ReLU6 (`Max 0` then `Min 6`) of the EfficientNet-Lite / MobileNet family, which
//! tract's decluttered graph holds as binary max/min with a scalar constant. Fusing them saves one
//! pass over the conv's output per step.

use tract_core::internal::*;

/// A fused element-wise step after the convolution; the constant as f32 bits (so the op is `Eq + Hash`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Post {
    Max(u32),
    Min(u32),
}

/// The chain of element-wise max/min with a single f32 constant that follows node `id` (each link the
/// only consumer of the previous, none a model output, same shape), as [`Post`] steps, and the node
/// whose output the fused op replaces (`id` itself when nothing follows).
pub(crate) fn fusable_successors(model: &TypedModel, id: usize) -> TractResult<(Vec<Post>, usize)> {
    use tract_core::ops::binary::TypedBinOp;
    let outputs = model.output_outlets()?.to_vec();
    let shape = model.outlet_fact(id.into())?.shape.clone();
    let (mut post, mut last) = (Vec::new(), id);
    while post.len() < 2 {
        let outlet = OutletId::new(last, 0);
        let succ = model.outlet_successors(outlet);
        if succ.len() != 1 || outputs.contains(&outlet) {
            break;
        }
        let next = model.node(succ[0].node);
        let Some(bin) = next.op_as::<TypedBinOp>() else { break };
        if next.inputs.len() != 2 || next.outputs.len() != 1 {
            break;
        }
        let other = next.inputs[1 - succ[0].slot];
        let Some(k) = model.outlet_fact(other)?.konst.clone() else { break };
        let fact = model.outlet_fact(next.id.into())?;
        if k.datum_type() != f32::datum_type()
            || k.len() != 1
            || fact.shape != shape
            || fact.datum_type != f32::datum_type()
        {
            break;
        }
        let Some(v) = k.try_as_plain_ram().ok().and_then(|k| k.as_slice::<f32>().ok().map(|s| s[0])) else { break };
        post.push(match bin.0.name() {
            "Max" => Post::Max(v.to_bits()),
            "Min" => Post::Min(v.to_bits()),
            _ => break,
        });
        last = next.id;
    }
    Ok((post, last))
}

/// Applies the steps to `values`, in graph order (inlined into each kernel's register loop).
#[inline(always)]
pub(crate) fn apply(post: &[Post], values: &mut [f32]) {
    for p in post {
        match *p {
            Post::Max(v) => values.iter_mut().for_each(|a| *a = a.max(f32::from_bits(v))),
            Post::Min(v) => values.iter_mut().for_each(|a| *a = a.min(f32::from_bits(v))),
        }
    }
}

/// The steps as one clamp `(lo, hi)` with `lo <= hi`, or `None` when there are none: any chain of
/// max/min with constants is a clamp (`max(clamp(x, l, h), a) = clamp(x, max(l, a), max(h, a))`, and
/// likewise for min), so a kernel applies two vector instructions however long the chain. For non-NaN
/// values: a NaN becomes `lo` here, where the chain step by step (`apply`, `f32::max` / `min`) gives the
/// first step's constant.
pub(crate) fn as_clamp(post: &[Post]) -> Option<(f32, f32)> {
    if post.is_empty() {
        return None;
    }
    let (mut lo, mut hi) = (f32::NEG_INFINITY, f32::INFINITY);
    for p in post {
        match *p {
            Post::Max(v) => {
                let v = f32::from_bits(v);
                (lo, hi) = (lo.max(v), hi.max(v));
            }
            Post::Min(v) => {
                let v = f32::from_bits(v);
                (lo, hi) = (lo.min(v), hi.min(v));
            }
        }
    }
    Some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_of_max_and_min_are_one_clamp() {
        let chains: &[&[Post]] = &[
            &[Post::Max(0f32.to_bits())],
            &[Post::Max(0f32.to_bits()), Post::Min(6f32.to_bits())],
            &[Post::Min(6f32.to_bits()), Post::Max(0f32.to_bits())],
            &[Post::Max(3f32.to_bits()), Post::Min(1f32.to_bits())],
            &[Post::Min((-1f32).to_bits()), Post::Max(2f32.to_bits())],
            &[
                Post::Max((-2f32).to_bits()),
                Post::Max(1f32.to_bits()),
                Post::Min(4f32.to_bits()),
                Post::Min(0.5f32.to_bits()),
            ],
        ];
        for chain in chains {
            let (lo, hi) = as_clamp(chain).unwrap();
            assert!(lo <= hi, "{chain:?}");
            for i in -80..=80 {
                let x = i as f32 * 0.1;
                let mut want = x;
                for p in *chain {
                    want = match *p {
                        Post::Max(v) => want.max(f32::from_bits(v)),
                        Post::Min(v) => want.min(f32::from_bits(v)),
                    };
                }
                assert_eq!(x.max(lo).min(hi), want, "{chain:?} at {x}");
            }
        }
        assert_eq!(as_clamp(&[]), None);
    }
}
