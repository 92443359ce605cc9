// The two ways a reduction sums each chunk of its terms (src/kernels/sums.rs: the tuner
// picks one per shape class), written once for batch norm, softmax and the losses. A
// reduction supplies, as functions:
//   COUNT()                   its chunks in this launch;
//   SUMS(idx, first, step)    the partial result of chunk idx over its terms first,
//                             first + step, first + 2 step, ... in order;
//   COMBINE(a, b)             two partial results made one (a sum, or softmax's
//                             (max, sum of exp) merge);
//   STORE(idx, result)        where chunk idx's result goes.
// Results are vec2<f32> (the workgroup tree needs one concrete type); a single sum uses .x.
// Both fix the order of every operation: the results are bit-reproducible.

// Invocations of a tree's workgroup (src/kernels/sums.rs: TREE_WORKGROUP).
const TREE_SIZE: u32 = 64u;
var<workgroup> tree: array<vec2<f32>, TREE_SIZE>;

fn tree_add(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    return a + b;
}

#template chunk_reductions(ENTRY, COUNT, SUMS, COMBINE, STORE)
// An invocation per chunk summing in order: what a CPU driver runs best.
@compute @workgroup_size(WG)
fn ${ENTRY}(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = linear_index(gid, nwg);
    if idx >= ${COUNT}() { return; }
    ${STORE}(idx, ${SUMS}(idx, 0u, 1u));
}

// A workgroup of 64 per chunk, the variant for GPUs: invocation lid takes terms lid,
// lid + 64, ... (neighbours read neighbours), then the 64 results meet in a tree through
// workgroup memory, lid with lid + 32, then with lid + 16, ... The early return is the
// whole workgroup's (idx is), so every barrier is reached by all or none.
@compute @workgroup_size(TREE_SIZE)
fn ${ENTRY}_tree(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let idx = wid.x + wid.y * nwg.x;
    if idx >= ${COUNT}() { return; }
    tree[lid] = ${SUMS}(idx, lid, TREE_SIZE);
    for (var half = TREE_SIZE / 2u; half > 0u; half /= 2u) {
        workgroupBarrier();
        if lid < half { tree[lid] = ${COMBINE}(tree[lid], tree[lid + half]); }
    }
    if lid == 0u { ${STORE}(idx, tree[0]); }
}

#if SUBGROUPS
// The tree again, where the adapter has SUBGROUP (the module composed with SUBGROUPS): the
// levels at least a subgroup wide through workgroup memory, the rest in subgroup shuffles.
// Lane i of every subgroup takes slot i and combines it with lane i + half's value, as the
// tree combines slot i with slot i + half, so whatever the order of invocations in
// subgroups the result is the tree's to the bit; the subgroup holding invocation 0 stores
// it.
@compute @workgroup_size(TREE_SIZE)
fn ${ENTRY}_subgroup(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32,
                     @builtin(subgroup_invocation_id) lane: u32,
                     @builtin(subgroup_size) width: u32) {
    let idx = wid.x + wid.y * nwg.x;
    if idx >= ${COUNT}() { return; }
    tree[lid] = ${SUMS}(idx, lid, TREE_SIZE);
    var half = TREE_SIZE / 2u;
    for (; half >= width; half /= 2u) {
        workgroupBarrier();
        if lid < half { tree[lid] = ${COMBINE}(tree[lid], tree[lid + half]); }
    }
    workgroupBarrier();
    var v = tree[lane];
    for (; half > 0u; half /= 2u) {
        v = ${COMBINE}(v, subgroupShuffleDown(v, half));
    }
    if subgroupAny(lid == 0u) && lane == 0u { ${STORE}(idx, v); }
}
#end
#end
