/// The dependency graph in compressed sparse rows: parallel edges between two transactions are
/// merged into one edge whose mask holds every relation (ww, wr, rw, realtime), with the first
/// reason of each value relation kept.
struct DependencyGraph {
    let nodeCount: Int
    private(set) var offsets: [Int]
    private(set) var targets: [Int32] = []
    private(set) var masks: [UInt8] = []
    /// Three per edge (ww, wr, rw): an index into the inference's reasons, or -1.
    private(set) var reasonSlots: [Int32] = []

    /// - Complexity: O(E log d) for E raw edges and out-degree d.
    init(nodeCount: Int, edges: [RawEdge]) {
        self.nodeCount = nodeCount
        var starts = [Int](repeating: 0, count: nodeCount + 1)
        for edge in edges { starts[Int(edge.from) + 1] += 1 }
        for node in 0..<nodeCount { starts[node + 1] += starts[node] }
        var fill = starts
        var order = [Int32](repeating: 0, count: edges.count)
        for (index, edge) in edges.enumerated() {
            order[fill[Int(edge.from)]] = Int32(index)
            fill[Int(edge.from)] += 1
        }
        offsets = [0]
        offsets.reserveCapacity(nodeCount + 1)
        targets.reserveCapacity(edges.count)
        var bucket: [Int32] = []
        for node in 0..<nodeCount {
            let begin = targets.count
            bucket.removeAll(keepingCapacity: true)
            bucket.append(contentsOf: order[starts[node]..<starts[node + 1]])
            bucket.sort { (edges[Int($0)].to, $0) < (edges[Int($1)].to, $1) }
            for id in bucket {
                let edge = edges[Int(id)]
                if targets.count == begin || targets[targets.count - 1] != edge.to {
                    targets.append(edge.to)
                    masks.append(0)
                    reasonSlots.append(contentsOf: [-1, -1, -1])
                }
                let last = targets.count - 1
                masks[last] |= edge.kind
                if edge.kind != EdgeKind.rt {
                    let slot = last * 3 + EdgeKind.slot(edge.kind)
                    if reasonSlots[slot] < 0 { reasonSlots[slot] = edge.reason }
                }
            }
            offsets.append(targets.count)
        }
    }

    /// The subgraph induced by `nodes` (global ids; local id = position), keeping the edges
    /// with a relation in `allowed` (their masks cut to `allowed`).
    /// `scratch` has one entry per node, all -1, and is left so.
    func subgraph(_ nodes: [Int32], allowed: UInt8, scratch: inout [Int32]) -> LocalGraph {
        for (local, node) in nodes.enumerated() { scratch[Int(node)] = Int32(local) }
        var local = LocalGraph(nodes: nodes)
        local.offsets.reserveCapacity(nodes.count + 1)
        for node in nodes {
            for edge in offsets[Int(node)]..<offsets[Int(node) + 1] {
                let target = scratch[Int(targets[edge])]
                let mask = masks[edge] & allowed
                if target >= 0, mask != 0 {
                    local.targets.append(target)
                    local.masks.append(mask)
                    local.edgeIDs.append(Int32(edge))
                }
            }
            local.offsets.append(Int32(local.targets.count))
        }
        for node in nodes { scratch[Int(node)] = -1 }
        return local
    }

    func reason(edge: Int32, kind: UInt8) -> Int32 {
        reasonSlots[Int(edge) * 3 + EdgeKind.slot(kind)]
    }
}

/// A subgraph with local node ids 0..<count.
struct LocalGraph {
    /// Local id → global node (transaction id).
    var nodes: [Int32]
    var offsets: [Int32] = [0]
    var targets: [Int32] = []
    var masks: [UInt8] = []
    /// Local edge → merged edge of the ``DependencyGraph``.
    var edgeIDs: [Int32] = []

    init(nodes: [Int32]) {
        self.nodes = nodes
    }

    var count: Int { nodes.count }

    /// Tarjan's strongly connected components over the edges with a relation in `mask`
    /// (iterative, so deep graphs cannot overflow the stack). Components are numbered in the
    /// order Tarjan emits them, which is a reverse topological order of the condensation: an
    /// edge between two components goes from a higher number to a lower one.
    /// - Complexity: O(V + E).
    func components(mask: UInt8) -> (ids: [Int32], count: Int) {
        let n = count
        var index = [Int32](repeating: -1, count: n)
        var low = [Int32](repeating: 0, count: n)
        var component = [Int32](repeating: -1, count: n)
        var onStack = [Bool](repeating: false, count: n)
        var stack: [Int32] = []
        var calls: [(node: Int32, edge: Int32)] = []
        var counter: Int32 = 0
        var components: Int32 = 0
        for root in 0..<n where index[root] < 0 {
            index[root] = counter
            low[root] = counter
            counter += 1
            stack.append(Int32(root))
            onStack[root] = true
            calls.append((Int32(root), offsets[root]))
            while let (node, edge) = calls.last {
                let v = Int(node)
                if edge < offsets[v + 1] {
                    calls[calls.count - 1].edge += 1
                    guard masks[Int(edge)] & mask != 0 else { continue }
                    let w = Int(targets[Int(edge)])
                    if index[w] < 0 {
                        index[w] = counter
                        low[w] = counter
                        counter += 1
                        stack.append(Int32(w))
                        onStack[w] = true
                        calls.append((Int32(w), offsets[w]))
                    } else if onStack[w] {
                        low[v] = min(low[v], index[w])
                    }
                } else {
                    calls.removeLast()
                    if let parent = calls.last {
                        low[Int(parent.node)] = min(low[Int(parent.node)], low[v])
                    }
                    if low[v] == index[v] {
                        while true {
                            let w = Int(stack.removeLast())
                            onStack[w] = false
                            component[w] = components
                            if w == v { break }
                        }
                        components += 1
                    }
                }
            }
        }
        return (component, Int(components))
    }

    /// The components with two or more nodes, as lists of local ids.
    static func groups(_ ids: [Int32], count: Int) -> [[Int32]] {
        var sizes = [Int](repeating: 0, count: count)
        for id in ids { sizes[Int(id)] += 1 }
        var slot = [Int](repeating: -1, count: count)
        var groups: [[Int32]] = []
        for (node, id) in ids.enumerated() where sizes[Int(id)] >= 2 {
            if slot[Int(id)] < 0 {
                slot[Int(id)] = groups.count
                groups.append([])
            }
            groups[slot[Int(id)]].append(Int32(node))
        }
        return groups
    }
}

/// A cycle class: which relations it may use, which it needs, and how many.
struct CycleSpec {
    var kind: AnomalyKind
    var allowed: UInt8
    /// The relation of the edge each search starts from (one the cycle needs).
    var seed: UInt8
    var minRW = 0
    var maxRW = 2
    var minWR = 0
    var minRT = 0

    /// The value relations; realtime counts only on edges no allowed value relation explains.
    var base: UInt8 { allowed & ~EdgeKind.rt }

    static let all: [CycleSpec] = [
        CycleSpec(kind: .g0, allowed: EdgeKind.ww, seed: EdgeKind.ww, maxRW: 0),
        CycleSpec(kind: .g1c, allowed: EdgeKind.ww | EdgeKind.wr, seed: EdgeKind.wr, maxRW: 0, minWR: 1),
        CycleSpec(kind: .gSingle, allowed: EdgeKind.ww | EdgeKind.wr | EdgeKind.rw, seed: EdgeKind.rw, minRW: 1, maxRW: 1),
        CycleSpec(kind: .g2Item, allowed: EdgeKind.ww | EdgeKind.wr | EdgeKind.rw, seed: EdgeKind.rw, minRW: 2),
        CycleSpec(kind: .g0Realtime, allowed: EdgeKind.ww | EdgeKind.rt, seed: EdgeKind.rt, maxRW: 0, minRT: 1),
        CycleSpec(kind: .g1cRealtime, allowed: EdgeKind.ww | EdgeKind.wr | EdgeKind.rt, seed: EdgeKind.rt, maxRW: 0, minWR: 1, minRT: 1),
        CycleSpec(kind: .gSingleRealtime, allowed: EdgeKind.all, seed: EdgeKind.rw, minRW: 1, maxRW: 1, minRT: 1),
        CycleSpec(kind: .g2ItemRealtime, allowed: EdgeKind.all, seed: EdgeKind.rw, minRW: 2, minRT: 1),
    ]

    /// The class of a cycle by its edges' relations.
    static func classify(_ cycle: [CycleEdge]) -> AnomalyKind {
        let rw = cycle.filter { $0.kind == EdgeKind.rw }.count
        let wr = cycle.contains { $0.kind == EdgeKind.wr }
        let realtime = cycle.contains { $0.kind == EdgeKind.rt }
        switch (rw, realtime) {
        case (0, false): return wr ? .g1c : .g0
        case (0, true): return wr ? .g1cRealtime : .g0Realtime
        case (1, false): return .gSingle
        case (1, true): return .gSingleRealtime
        case (_, false): return .g2Item
        case (_, true): return .g2ItemRealtime
        }
    }

    /// Whether an edge (mask already cut to `allowed`) can be the seed.
    func isSeed(_ mask: UInt8) -> Bool {
        seed == EdgeKind.rt ? mask & base == 0 && mask & EdgeKind.rt != 0 : mask & seed != 0
    }

    // A search state counts rw (0, 1, 2+), whether a wr and whether a realtime edge was used.
    static func advance(_ state: Int, _ kind: UInt8) -> Int {
        switch kind {
        case EdgeKind.rw: state % 3 == 2 ? state : state + 1
        case EdgeKind.wr: (state / 3) % 2 == 1 ? state : state + 3
        case EdgeKind.rt: state >= 6 ? state : state + 6
        default: state
        }
    }

    func allows(_ state: Int) -> Bool { state % 3 <= maxRW }

    func accepts(_ state: Int) -> Bool {
        state % 3 >= minRW && state % 3 <= maxRW && (state / 3) % 2 >= minWR && state / 6 >= minRT
    }
}

/// One edge of a found cycle (global transaction ids; the merged edge, for its reason).
struct CycleEdge {
    var from: Int32
    var to: Int32
    var kind: UInt8
    var edge: Int32
}

/// Reused buffers of the breadth-first searches in one component.
struct SearchBuffers {
    var seen: [UInt32]
    var parent: [Int32]
    var via: [Int32]
    var viaKind: [UInt8]
    var queue: [Int32] = []
    var stamp: UInt32 = 0

    init(count: Int) {
        seen = [UInt32](repeating: 0, count: count * 12)
        parent = [Int32](repeating: -1, count: count * 12)
        via = [Int32](repeating: -1, count: count * 12)
        viaKind = [UInt8](repeating: 0, count: count * 12)
    }
}

extension LocalGraph {
    /// A short cycle of class `spec` in this strongly connected component, or nil.
    ///
    /// Seeds are the edges of the needed relation that do not go forward in a topological
    /// order of the component's condensation without that relation: every cycle of the class
    /// contains such an edge, so no cycle is missed for want of a seed, and edges that cannot
    /// close a cycle are skipped. From a seed u -> v it searches breadth first, over states
    /// (node, relations used so far), for the shortest path v ~> u that completes a cycle of
    /// the class; it keeps the shortest of the first few found.
    /// - Complexity: O(12 E) per seed tried, at most `maxSeeds` seeds, and `budget` steps.
    func findCycle(_ spec: CycleSpec, maxSeeds: Int, budget: inout Int) -> [CycleEdge]? {
        let prime = components(mask: spec.allowed & ~spec.seed).ids
        var sameComponent: [(Int32, Int32)] = []
        var backward: [(Int32, Int32)] = []
        for u in 0..<count {
            for edge in Int(offsets[u])..<Int(offsets[u + 1]) where spec.isSeed(masks[edge]) {
                let v = Int(targets[edge])
                if prime[v] == prime[u] {
                    sameComponent.append((Int32(u), Int32(edge)))
                } else if prime[v] > prime[u] {
                    backward.append((Int32(u), Int32(edge)))
                }
            }
        }
        var buffers = SearchBuffers(count: count)
        var best: [CycleEdge]?
        var tried = 0
        var triedSinceFound = 0
        for (u, edge) in sameComponent + backward {
            guard tried < maxSeeds, budget > 0 else { break }
            tried += 1
            if best != nil {
                triedSinceFound += 1
                if triedSinceFound > 8 { break }
            }
            guard let cycle = search(spec, from: u, seedEdge: edge, buffers: &buffers, budget: &budget) else { continue }
            if best == nil || cycle.count < best!.count { best = cycle }
            if best!.count <= 2 { break }
        }
        return best
    }

    /// Some cycle through local node 0 of this strongly connected component (breadth first, so
    /// a shortest one through it), each edge taken as its strongest relation (ww, then wr, rw,
    /// realtime).
    /// - Complexity: O(V + E).
    func anyCycle() -> [CycleEdge]? {
        guard count >= 2 else { return nil }
        var parentEdge = [Int32](repeating: -1, count: count)
        var parentNode = [Int32](repeating: -1, count: count)
        var queue: [Int32] = [0]
        var head = 0
        parentNode[0] = 0
        func strongest(_ mask: UInt8) -> UInt8 {
            [EdgeKind.ww, EdgeKind.wr, EdgeKind.rw, EdgeKind.rt].first { mask & $0 != 0 } ?? EdgeKind.rt
        }
        while head < queue.count {
            let x = Int(queue[head])
            head += 1
            for edge in Int(offsets[x])..<Int(offsets[x + 1]) {
                let y = Int(targets[edge])
                if y == 0 {
                    var path = [CycleEdge(from: nodes[x], to: nodes[0], kind: strongest(masks[edge]), edge: edgeIDs[edge])]
                    var node = x
                    while node != 0 {
                        let via = Int(parentEdge[node])
                        let previous = Int(parentNode[node])
                        path.append(CycleEdge(from: nodes[previous], to: nodes[node], kind: strongest(masks[via]), edge: edgeIDs[via]))
                        node = previous
                    }
                    return path.reversed()
                }
                if parentNode[y] < 0 {
                    parentNode[y] = Int32(x)
                    parentEdge[y] = Int32(edge)
                    queue.append(Int32(y))
                }
            }
        }
        return nil
    }

    private func kinds(of mask: UInt8, base: UInt8) -> [UInt8] {
        let values = mask & base
        if values == 0 { return mask & EdgeKind.rt != 0 ? [EdgeKind.rt] : [] }
        return [EdgeKind.ww, EdgeKind.wr, EdgeKind.rw].filter { values & $0 != 0 }
    }

    /// Breadth first from the seed's target back to its source; nil when no cycle of the class
    /// closes through the seed (or the budget ran out, or the walk found is not a simple cycle).
    private func search(_ spec: CycleSpec, from u: Int32, seedEdge: Int32, buffers: inout SearchBuffers, budget: inout Int) -> [CycleEdge]? {
        let v = targets[Int(seedEdge)]
        let start = CycleSpec.advance(0, spec.seed)
        guard spec.allows(start) else { return nil }
        buffers.stamp &+= 1
        let stamp = buffers.stamp
        let base = spec.base
        let first = Int(v) * 12 + start
        buffers.seen[first] = stamp
        buffers.parent[first] = -1
        buffers.queue.removeAll(keepingCapacity: true)
        buffers.queue.append(Int32(first))
        var head = 0
        var found: (state: Int, edge: Int32, kind: UInt8)?
        search: while head < buffers.queue.count {
            let current = Int(buffers.queue[head])
            head += 1
            let x = current / 12, state = current % 12
            for edge in Int(offsets[x])..<Int(offsets[x + 1]) {
                budget -= 1
                if budget < 0 { return nil }
                let y = targets[edge]
                if y == v { continue }
                for kind in kinds(of: masks[edge], base: base) {
                    let next = CycleSpec.advance(state, kind)
                    guard spec.allows(next) else { continue }
                    if y == u {
                        if spec.accepts(next) {
                            found = (current, Int32(edge), kind)
                            break search
                        }
                        continue
                    }
                    let slot = Int(y) * 12 + next
                    if buffers.seen[slot] == stamp { continue }
                    buffers.seen[slot] = stamp
                    buffers.parent[slot] = Int32(current)
                    buffers.via[slot] = Int32(edge)
                    buffers.viaKind[slot] = kind
                    buffers.queue.append(Int32(slot))
                }
            }
        }
        guard let found else { return nil }
        // Rebuild: the seed, then the path v ~> x, then x -> u.
        var path: [CycleEdge] = [CycleEdge(from: nodes[Int(found.state / 12)], to: nodes[Int(u)], kind: found.kind, edge: edgeIDs[Int(found.edge)])]
        var slot = found.state
        while slot != first {
            let previous = Int(buffers.parent[slot])
            path.append(CycleEdge(from: nodes[previous / 12], to: nodes[slot / 12], kind: buffers.viaKind[slot], edge: edgeIDs[Int(buffers.via[slot])]))
            slot = previous
        }
        path.append(CycleEdge(from: nodes[Int(u)], to: nodes[Int(v)], kind: spec.seed, edge: edgeIDs[Int(seedEdge)]))
        path.reverse()
        let visited = Set(path.map(\.from))
        return visited.count == path.count ? path : nil
    }
}

extension Inference {
    /// Tarjan's components of the whole graph, then each cycle class's search inside them.
    mutating func findCycles() {
        let graph = DependencyGraph(nodeCount: transactions.count, edges: edges)
        edges = []
        var scratch = [Int32](repeating: -1, count: transactions.count)
        let nodes = (0..<transactions.count).filter { included[$0] }.map(Int32.init)
        let whole = graph.subgraph(nodes, allowed: EdgeKind.all, scratch: &scratch)
        let (ids, componentCount) = whole.components(mask: EdgeKind.all)
        let strong = LocalGraph.groups(ids, count: componentCount).map { $0.map { whole.nodes[Int($0)] } }
        guard !strong.isEmpty else { return }
        var explained = [Bool](repeating: false, count: strong.count)
        for spec in CycleSpec.all {
            var budget = options.searchBudget
            for (number, component) in strong.enumerated() {
                let restricted = graph.subgraph(component, allowed: spec.allowed, scratch: &scratch)
                let (subIDs, subCount) = restricted.components(mask: spec.allowed)
                for group in LocalGraph.groups(subIDs, count: subCount) {
                    let local = graph.subgraph(group.map { restricted.nodes[Int($0)] }, allowed: spec.allowed, scratch: &scratch)
                    if let cycle = local.findCycle(spec, maxSeeds: options.maxSeeds, budget: &budget) {
                        explained[number] = true
                        collector.add(spec.kind) { cycleAnomaly(spec.kind, cycle, graph: graph) }
                    }
                    if budget <= 0 { break }
                }
                if budget <= 0 { break }
            }
            if budget <= 0 { incompleteSearches.append(spec.kind) }
        }
        // A component is a cycle, so the history is invalid even where the searches above gave
        // up (budget, seeds): report one cycle of it, found by a plain search, under its class.
        for (number, component) in strong.enumerated() where !explained[number] {
            let local = graph.subgraph(component, allowed: EdgeKind.all, scratch: &scratch)
            guard let cycle = local.anyCycle() else { continue }
            let kind = CycleSpec.classify(cycle)
            collector.add(kind) { cycleAnomaly(kind, cycle, graph: graph) }
        }
    }

    func cycleAnomaly(_ kind: AnomalyKind, _ cycle: [CycleEdge], graph: DependencyGraph) -> Anomaly {
        // Start from the transaction invoked first.
        let start = cycle.indices.min { transactions[Int(cycle[$0].from)].invoke.index < transactions[Int(cycle[$1].from)].invoke.index } ?? 0
        let rotated = Array(cycle[start...] + cycle[..<start])
        let steps = rotated.map { edge in
            CycleStep(from: transactions[Int(edge.from)].invoke.index, to: transactions[Int(edge.to)].invoke.index,
                      relation: EdgeKind.name(edge.kind), explanation: explain(edge, graph: graph))
        }
        let chain = rotated.map { "\(name($0.from)) -\(EdgeKind.name($0.kind))->" }.joined(separator: " ") + " \(name(rotated[0].from))"
        let counts = [EdgeKind.ww, EdgeKind.wr, EdgeKind.rw, EdgeKind.rt].compactMap { kind -> String? in
            let number = rotated.filter { $0.kind == kind }.count
            return number == 0 ? nil : "\(number) \(EdgeKind.name(kind))"
        }.joined(separator: ", ")
        return Anomaly(kind: kind, key: nil,
                       explanation: "a cycle of \(rotated.count) transactions (\(counts)): \(chain)",
                       transactions: rotated.map { summary($0.from) }, cycle: steps)
    }

    func explain(_ edge: CycleEdge, graph: DependencyGraph) -> String {
        let a = name(edge.from), b = name(edge.to)
        let arrow = "\(a) \(EdgeKind.name(edge.kind))-> \(b): "
        if edge.kind == EdgeKind.rt {
            let earlier = transactions[Int(edge.from)], later = transactions[Int(edge.to)]
            let completion = earlier.completion.map { "index \($0.index), time \($0.time)" } ?? "?"
            let process = earlier.process == later.process ? "; both are process \(earlier.process)'s, in this order" : ""
            return arrow + "\(a) completed (\(completion)) before \(b) was invoked (index \(later.invoke.index), time \(later.invokeTime))\(process)"
        }
        let slot = graph.reason(edge: edge.edge, kind: edge.kind)
        guard slot >= 0 else { return arrow + "(no recorded reason)" }
        let reason = reasons[Int(slot)]
        let key = reason.key
        let witness = reason.witness >= 0 ? ", per the read by \(name(reason.witness))" : ""
        switch reason.source {
        case .listWW:
            return arrow + "\(b) appended \(reason.second) after \(a)'s \(reason.first) to key \(key)\(witness)"
        case .listWR:
            return arrow + "\(b) read key \(key) ending in \(reason.first) (\(reason.length) element\(reason.length == 1 ? "" : "s")), which \(a) appended"
        case .listRW:
            if reason.length == 0 {
                return arrow + "\(a) read key \(key) as empty, and \(b) appended \(reason.second), its first element\(witness)"
            }
            return arrow + "\(a) read key \(key) ending in \(reason.first) (\(reason.length) element\(reason.length == 1 ? "" : "s")), and \(b) appended \(reason.second), the next element\(witness)"
        case .registerWR:
            return arrow + "\(b) read key \(key) = \(reason.first), which \(a) wrote"
        case .registerWW:
            return arrow + "\(b) read key \(key) = \(reason.first), which \(a) wrote, and overwrote it with \(reason.second)"
        case .registerRW:
            let version = reason.initial ? "null (the initial value)" : "\(reason.first)"
            return arrow + "\(a) read key \(key) = \(version), and \(b) read that version too and overwrote it with \(reason.second)"
        }
    }
}
