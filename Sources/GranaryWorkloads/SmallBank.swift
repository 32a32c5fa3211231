import Granary

/// SmallBank as specified in docs/WORKLOADS.md: Accounts, Savings and Checking tables, the six
/// transactions, 90% of transactions on 4,000 hot accounts. Balances are integer cents, so money
/// is counted exactly: deposits of 1.30 are 130 cents.
///
/// Transactions address customers by id (as DrTM and FORD do); the Accounts table (id -> name) is
/// loaded for completeness of the schema.
package struct SmallBankWorkload: Workload {
    package struct Name: Sendable, BitwiseCopyable {
        package var bytes: (UInt64, UInt64)
    }

    package static let types = ["AMALGAMATE", "BALANCE", "DEPOSIT_CHECKING", "SEND_PAYMENT", "TRANSACT_SAVINGS", "WRITE_CHECK"]
    /// Cumulative mix in percent, in the order of ``types``.
    static let mix = [15, 30, 45, 70, 85, 100]

    package let accounts: Int
    package let hotAccounts: Int
    package let seed: UInt64
    /// Restricts the mix to these transaction types (indexes into ``types``), equally weighted;
    /// nil runs the full mix. (The peer comparison runs SEND_PAYMENT and AMALGAMATE only.)
    package var only: [Int]?
    /// The three tables, once loaded.
    final class Tables: Sendable {
        let names: TransactionalHashTable<Name>
        let savings: TransactionalHashTable<Int64>
        let checking: TransactionalHashTable<Int64>
        init(names: TransactionalHashTable<Name>, savings: TransactionalHashTable<Int64>, checking: TransactionalHashTable<Int64>) {
            self.names = names
            self.savings = savings
            self.checking = checking
        }
    }
    /// Owns the tables.
    var tables: Tables?
    /// The same, unretained, for ``runOne(on:transaction:random:)``: a strong reference taken out
    /// of an optional is retained and released on every transaction, atomic writes to the tables'
    /// reference counts that every worker thread would pass between the cores.
    var unretainedTables: Unmanaged<Tables>?
    package private(set) var initialTotal: Int64 = 0

    package init(accounts: Int = 100_000, hotAccounts: Int = 4_000, seed: UInt64 = 1, only: [Int]? = nil) {
        self.accounts = max(2, accounts)
        self.hotAccounts = max(2, min(hotAccounts, accounts))
        self.seed = seed
        self.only = only
    }

    package var transactionTypes: [String] { Self.types }

    package mutating func load(into cluster: Cluster) async throws {
        let n = accounts
        let loaded = Tables(names: try await .create(name: "accounts", capacity: n, in: cluster),
                            savings: try await .create(name: "savings", capacity: n, in: cluster),
                            checking: try await .create(name: "checking", capacity: n, in: cluster))
        self.tables = loaded
        self.unretainedTables = Unmanaged.passUnretained(loaded)
        let tables = (loaded.names, loaded.savings, loaded.checking)
        let seed = self.seed
        let batch = max(1, cluster.nodes[0].engine.maximumRecordBytes / 800)
        initialTotal = try await withThrowingTaskGroup(of: Int64.self) { group in
            for (index, node) in cluster.nodes.enumerated() {
                group.addTask {
                    var total: Int64 = 0
                    for first in stride(from: index * batch, to: n, by: batch * cluster.nodes.count) {
                        let last = min(first + batch, n)
                        total += try await loadTransaction(on: node) { tx in
                            var sum: Int64 = 0
                            for customer in first..<last {
                                var random = WorkloadRandom(seed: seed &+ UInt64(customer) &* 0x9_0000_0001)
                                let save = Int64(random.uniform(10_000...50_000)) * 100
                                let check = Int64(random.uniform(10_000...50_000)) * 100
                                try tables.0.insert(UInt64(customer), Name(bytes: (UInt64(customer), 0x6E61_6D65)), in: tx)
                                try tables.1.insert(UInt64(customer), save, in: tx)
                                try tables.2.insert(UInt64(customer), check, in: tx)
                                sum += save + check
                            }
                            return sum
                        }
                    }
                    return total
                }
            }
            return try await group.reduce(0, +)
        }
    }

    /// An account: 90% among the hot ones.
    func account(_ random: inout WorkloadRandom) -> UInt64 {
        random.uniform(1...100) <= 90 ? UInt64(random.uniform(0...(hotAccounts - 1))) : UInt64(random.uniform(0...(accounts - 1)))
    }

    func twoAccounts(_ random: inout WorkloadRandom) -> (UInt64, UInt64) {
        let a = account(&random)
        var b = account(&random)
        while b == a { b = account(&random) }
        return (a, b)
    }

    struct Missing: Error {}

    package func runOne(on node: Node, transaction tx: Transaction, random: inout WorkloadRandom) throws -> TransactionOutcome {
        let type: Int
        if let only { type = only[random.uniform(0...(only.count - 1))] } else {
            let roll = random.uniform(1...100)
            type = Self.mix.firstIndex { roll <= $0 }!
        }
        return try unretainedTables.unsafelyUnwrapped._withUnsafeGuaranteedRef { tables in
            try run(type, savings: tables.savings, checking: tables.checking, transaction: tx, random: &random)
        }
    }

    private func run(_ type: Int, savings: TransactionalHashTable<Int64>, checking: TransactionalHashTable<Int64>,
                     transaction tx: Transaction, random: inout WorkloadRandom) throws -> TransactionOutcome {
        func balance(_ table: TransactionalHashTable<Int64>, _ customer: UInt64) throws -> Int64 {
            guard let value = try table.get(customer, in: tx) else { throw Missing() }
            return value
        }
        switch type {
        case 0:  // AMALGAMATE(a, b): b.checking += a.savings + a.checking; a's balances := 0
            let (a, b) = twoAccounts(&random)
            savings.prefetch(a, in: tx)
            checking.prefetch(a, in: tx)
            checking.prefetch(b, in: tx)
            let moved = try balance(savings, a) + balance(checking, a)
            try savings.update(a, in: tx) { $0 = 0 }
            try checking.update(a, in: tx) { $0 = 0 }
            try checking.update(b, in: tx) { $0 += moved }
            return TransactionOutcome(type: type)
        case 1:  // BALANCE(a)
            let a = account(&random)
            savings.prefetch(a, in: tx)
            checking.prefetch(a, in: tx)
            _ = try balance(savings, a) + balance(checking, a)
            return TransactionOutcome(type: type)
        case 2:  // DEPOSIT_CHECKING(a): checking += 1.30
            let a = account(&random)
            try checking.update(a, in: tx) { $0 += 130 }
            return TransactionOutcome(type: type, delta: 130)
        case 3:  // SEND_PAYMENT(a, b, 5): a business abort if a.checking < 5
            let (a, b) = twoAccounts(&random)
            checking.prefetch(a, in: tx)
            checking.prefetch(b, in: tx)
            guard try balance(checking, a) >= 500 else { return TransactionOutcome(type: type, succeeded: false) }
            try checking.update(a, in: tx) { $0 -= 500 }
            try checking.update(b, in: tx) { $0 += 500 }
            return TransactionOutcome(type: type)
        case 4:  // TRANSACT_SAVINGS(a): savings += 20.20
            let a = account(&random)
            try savings.update(a, in: tx) { $0 += 2_020 }
            return TransactionOutcome(type: type, delta: 2_020)
        default:  // WRITE_CHECK(a, 5): checking -= 6 if savings + checking < 5, else -= 5
            let a = account(&random)
            savings.prefetch(a, in: tx)
            checking.prefetch(a, in: tx)
            let total = try balance(savings, a) + balance(checking, a)
            let amount: Int64 = total < 500 ? 600 : 500
            try checking.update(a, in: tx) { $0 -= amount }
            return TransactionOutcome(type: type, delta: -amount)
        }
    }

    /// Money: the final total equals the initial total plus the committed deltas, plus those of
    /// some of the transactions in doubt.
    package func check(_ cluster: Cluster, committedDelta: Int64, inDoubt: [Int64]) async throws -> [String] {
        let serving = cluster.servingNodes  // a crashed node answers nothing
        var total: Int64 = 0
        let savings = tables!.savings, checking = tables!.checking
        for first in stride(from: 0, to: accounts, by: 500) {
            let last = min(first + 500, accounts)
            total += try await serving[first / 500 % serving.count].transaction { tx in
                var sum: Int64 = 0
                for customer in first..<last {
                    guard let s = try savings.get(UInt64(customer), in: tx), let c = try checking.get(UInt64(customer), in: tx) else {
                        throw Missing()
                    }
                    sum += s + c
                }
                return sum
            }
        }
        let expected = initialTotal + committedDelta
        return InDoubt.explains(total - expected, by: inDoubt) ? [] : ["money: final total \(total) cents, expected initial \(initialTotal) + committed deltas \(committedDelta) = \(expected)\(InDoubt.describe(inDoubt))"]
    }
}
