import Granary

/// The engine's micro-benchmark: move money between two random accounts (2 reads, 2 writes), the
/// accounts spread over every node's regions. Money is conserved.
package struct TransferWorkload: Workload {
    package var accounts: Int
    package var initialBalance: Int64 = 1_000_000
    package private(set) var addresses: [GlobalAddress] = []

    package init(accounts: Int) { self.accounts = accounts }

    package var transactionTypes: [String] { ["transfer"] }

    package mutating func load(into cluster: Cluster) async throws {
        addresses = []
        let perNode = (accounts + cluster.nodes.count - 1) / cluster.nodes.count
        for node in cluster.nodes {
            var remaining = min(perNode, accounts - addresses.count)
            while remaining > 0 {
                let batch = min(remaining, 200)
                let balance = initialBalance
                // Run again after an unknown outcome: if the first run committed, its accounts are
                // left unused (not in `addresses`, so outside the run and its check).
                addresses += try await loadTransaction(on: node) { tx in try (0..<batch).map { _ in try tx.allocate(balance) } }
                remaining -= batch
            }
        }
    }

    package func runOne(on node: Node, transaction tx: Transaction, random: inout WorkloadRandom) throws -> TransactionOutcome {
        let i = Int(random.next() % UInt64(addresses.count))
        let j = (i + 1 + Int(random.next() % UInt64(addresses.count - 1))) % addresses.count
        let a = addresses[i], b = addresses[j]
        tx.prefetch(a, payloadBytes: 8)
        tx.prefetch(b, payloadBytes: 8)
        let from = try tx.read(a, as: Int64.self)
        let to = try tx.read(b, as: Int64.self)
        let amount: Int64 = 1
        try tx.write(a, from - amount)
        try tx.write(b, to + amount)
        return TransactionOutcome(type: 0)
    }

    package func check(_ cluster: Cluster, committedDelta: Int64, inDoubt: [Int64]) async throws -> [String] {
        let serving = cluster.servingNodes  // a crashed node answers nothing
        var total: Int64 = 0
        for chunk in stride(from: 0, to: addresses.count, by: 500) {
            let slice = Array(addresses[chunk..<min(chunk + 500, addresses.count)])
            total += try await serving[0].transaction { tx in try slice.map { try tx.read($0, as: Int64.self) }.reduce(0, +) }
        }
        let expected = initialBalance * Int64(addresses.count)
        return total == expected ? [] : ["money not conserved: total \(total), expected \(expected)"]
    }
}
