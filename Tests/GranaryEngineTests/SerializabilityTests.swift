import Granary
import GranaryTestSupport
import Synchronization
import Testing

@Suite("Transactions: serializability")
struct SerializabilityTests {
    /// Money is conserved: 1,000 accounts over the regions of 3 nodes, transfers from every node,
    /// read-only audits of all accounts meanwhile.
    @Test("bank: the total is conserved at every audit and at the end, no balance goes negative")
    func bank() async throws {
        let cluster = try await testCluster()
        let accounts = 1_000
        let initial: Int64 = 1_000
        // Each node allocates a third of the accounts, so they live in every node's regions.
        var addresses: [GlobalAddress] = []
        for node in cluster.nodes {
            let share = try await node.transaction { tx in
                try (0..<(accounts / 3 + 1)).map { _ in try tx.allocate(initial) }
            }
            addresses += share
        }
        addresses = Array(addresses.prefix(accounts))
        let regions = Set(addresses.map(\.region))
        #expect(regions.count == cluster.configuration.regions.count, "accounts live in \(regions.count) regions")
        let expectedTotal = initial * Int64(accounts)
        let accountList = addresses

        let audits = Shared<[Int64]>([])
        let negative = Shared<[String]>([])
        let transfersPerWorker = 400
        try await withThrowingTaskGroup(of: Void.self) { group in
            for node in cluster.nodes {
                for worker in 0..<2 {
                    group.addTask {
                        var generator = SplitMix(seed: UInt64(node.id.index * 10 + worker))
                        for _ in 0..<transfersPerWorker {
                            let from = accountList[Int(generator.next() % UInt64(accounts))]
                            var to = accountList[Int(generator.next() % UInt64(accounts))]
                            if to == from { to = accountList[(accountList.firstIndex(of: from)! + 1) % accounts] }
                            let amount = Int64(generator.next() % 50)
                            try await node.transaction { tx in
                                let a = try tx.read(from, as: Int64.self)
                                let b = try tx.read(to, as: Int64.self)
                                guard a >= amount else { return }
                                try tx.write(from, a - amount)
                                try tx.write(to, b + amount)
                            }
                        }
                    }
                }
            }
            group.addTask {
                for round in 0..<5 {
                    let node = cluster.nodes[round % cluster.nodes.count]
                    let balances = try await node.transaction { tx in try accountList.map { try tx.read($0, as: Int64.self) } }
                    audits.withLock { $0.append(balances.reduce(0, +)) }
                    if let bad = balances.firstIndex(where: { $0 < 0 }) {
                        negative.withLock { $0.append("account \(accountList[bad]) = \(balances[bad])") }
                    }
                }
            }
            try await group.waitForAll()
        }
        let final = try await cluster.nodes[1].transaction { tx in try accountList.map { try tx.read($0, as: Int64.self) } }
        let seen = audits.withLock { $0 }
        #expect(seen.count == 5)
        #expect(seen.allSatisfy { $0 == expectedTotal }, "audit totals \(seen), expected \(expectedTotal) each")
        #expect(final.reduce(0, +) == expectedTotal)
        #expect(negative.withLock { $0 }.isEmpty, "negative balances: \(negative.withLock { $0 })")
        #expect(final.min()! >= 0)
        let committed = cluster.nodes.map(\.statistics.committed).reduce(0, +)
        let aborts = cluster.nodes.map(\.statistics.totalAborts).reduce(0, +)
        print("bank: \(committed) committed, \(aborts) aborted attempts")
        try await cluster.quiesce()
        #expect(replicaDifferences(cluster).isEmpty, "\(replicaDifferences(cluster))")
        try await cluster.shutdown()
    }

    /// Write skew: both transactions read x and y and each writes one of them only if x + y == 0.
    /// Serializable execution lets at most one of each pair write.
    @Test("write skew: of two transactions that read x and y and write one each, never both commit")
    func writeSkew() async throws {
        let cluster = try await testCluster()
        let x = try await cluster.nodes[0].transaction { try $0.allocate(Int64(0)) }
        let y = try await cluster.nodes[1].transaction { try $0.allocate(Int64(0)) }
        let violations = Mutex<[String]>([])
        for round in 0..<200 {
            try await cluster.nodes[2].transaction { tx in
                try tx.write(x, Int64(0))
                try tx.write(y, Int64(0))
            }
            let start = Atomic<Int>(0)
            await runThreads(2) { thread in
                let node = cluster.nodes[thread]
                start.add(1, ordering: .relaxed)
                while start.load(ordering: .relaxed) < 2 {}
                try! node.transactionSync { tx in
                    let sum = try tx.read(x, as: Int64.self) + tx.read(y, as: Int64.self)
                    if sum == 0 { try tx.write(thread == 0 ? x : y, Int64(1)) }
                }
            }
            let (a, b) = try await cluster.nodes[2].transaction { tx in (try tx.read(x, as: Int64.self), try tx.read(y, as: Int64.self)) }
            if a + b != 1 { violations.withLock { $0.append("round \(round): x = \(a), y = \(b)") } }
        }
        #expect(violations.withLock { $0 }.isEmpty, "write skew: \(violations.withLock { $0 })")
        try await cluster.shutdown()
    }

    @Test("lost update: N tasks x M increments of one counter end at exactly N x M")
    func lostUpdate() async throws {
        let cluster = try await testCluster()
        let counter = try await cluster.nodes[0].transaction { try $0.allocate(Int64(0)) }
        let tasks = 6, increments = 150
        try await withThrowingTaskGroup(of: Void.self) { group in
            for task in 0..<tasks {
                let node = cluster.nodes[task % cluster.nodes.count]
                group.addTask {
                    for _ in 0..<increments {
                        try await node.transaction { tx in try tx.write(counter, try tx.read(counter, as: Int64.self) + 1) }
                    }
                }
            }
            try await group.waitForAll()
        }
        let value = try await cluster.nodes[1].transaction { try $0.read(counter, as: Int64.self) }
        #expect(value == Int64(tasks * increments))
        try await cluster.shutdown()
    }
}

/// A small deterministic generator for reproducible workloads.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
