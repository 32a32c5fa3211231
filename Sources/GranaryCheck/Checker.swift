import Foundation

/// Settings of ``check(history:options:)``.
public struct CheckOptions: Sendable {
    /// Examples kept per anomaly class (all are counted).
    public var maxExamples: Int
    /// Breadth-first-search steps allowed per cycle class, over the whole history; when spent,
    /// the report says the search for that class was cut short. The default is far beyond what
    /// a 100,000-transaction history with a few anomalies needs.
    public var searchBudget: Int
    /// Seed edges tried per strongly connected component and cycle class.
    public var maxSeeds: Int

    /// Options with the given bounds; the defaults suit histories of 100,000 transactions.
    public init(maxExamples: Int = 5, searchBudget: Int = 50_000_000, maxSeeds: Int = 64) {
        self.maxExamples = maxExamples
        self.searchBudget = searchBudget
        self.maxSeeds = maxSeeds
    }
}

/// Checks `history` for strict serializability, the way Elle does for list-append and
/// rw-register histories.
///
/// It infers a dependency graph among committed transactions (`ok`, plus `info` ones whose
/// writes someone read): ww, wr and rw edges from the values read (for list-append each key's
/// version order is its longest read), realtime edges from completions and invocations (the
/// transitive reduction Elle builds: each invoke links to the current frontier of completions)
/// and process order. It then looks for cycles: Tarjan's strongly connected components, and
/// within each, a breadth-first search for a short cycle of each class: G0, G1c, G-single,
/// G2-item, then the realtime variants, which need at least one edge that only real time
/// explains. Non-cycle anomalies (G1a, G1b, internal, duplicate-elements, incompatible-order,
/// garbage-read, lost-append, lost-update) come from the same pass over the reads.
///
/// - Returns: the report; never throws (a malformed history is refused when the ``History``
///   is built).
/// - Complexity: O(n + E + R) for n transactions, E edges (about 4n plus n times the
///   concurrency for realtime) and R elements read, plus the cycle searches, which are bounded
///   by ``CheckOptions/searchBudget``. A history of 100,000 list-append transactions takes
///   well under a second in a release build.
public func check(history: History, options: CheckOptions = CheckOptions()) -> CheckReport {
    var inference = Inference(history: history, options: options)
    inference.inferFromValues()
    inference.addRealtimeEdges()
    inference.findCycles()
    return inference.report()
}

// MARK: - Edge kinds and reasons

enum EdgeKind {
    static let ww: UInt8 = 1
    static let wr: UInt8 = 2
    static let rw: UInt8 = 4
    static let rt: UInt8 = 8
    static let all: UInt8 = 15

    static func name(_ kind: UInt8) -> String {
        switch kind {
        case ww: "ww"
        case wr: "wr"
        case rw: "rw"
        default: "realtime"
        }
    }

    /// The reason slot of a value kind (realtime edges need no stored reason).
    static func slot(_ kind: UInt8) -> Int {
        switch kind {
        case ww: 0
        case wr: 1
        default: 2
        }
    }
}

/// Why a ww, wr or rw edge exists (rendered only for the edges of reported cycles).
struct EdgeReason {
    enum Source: UInt8 { case listWW, listWR, listRW, registerWR, registerWW, registerRW }
    var source: Source
    var key: Int
    /// listWW: the earlier element; listWR/listRW: the last element read; register: the value read.
    var first: Int
    /// listWW/listRW: the next element; registerWW/registerRW: the value written.
    var second: Int
    /// listWR/listRW: the read's length.
    var length: Int
    /// The transaction whose read shows the order (listWW, listRW), or -1.
    var witness: Int32
    /// register: the read saw the initial (null) value.
    var initial: Bool
}

struct RawEdge {
    var from: Int32
    var to: Int32
    var kind: UInt8
    var reason: Int32
}

// MARK: - Inference

struct Inference {
    let history: History
    let transactions: [HistoryTransaction]
    let options: CheckOptions
    let collector: AnomalyCollector
    /// Whether a transaction is a node of the dependency graph (ok, or info with an observed write).
    var included: [Bool]
    var edges: [RawEdge] = []
    var reasons: [EdgeReason] = []
    var listKeyCount = 0
    var registerKeyCount = 0
    var incompleteSearches: [AnomalyKind] = []

    init(history: History, options: CheckOptions) {
        self.history = history
        self.transactions = history.transactions
        self.options = options
        self.collector = AnomalyCollector(maxExamples: options.maxExamples)
        self.included = history.transactions.map { $0.status == .ok }
    }

    func name(_ txn: Int32) -> String { transactions[Int(txn)].name }
    func summary(_ txn: Int32) -> TransactionSummary { TransactionSummary(transactions[Int(txn)]) }

    mutating func addEdge(_ from: Int32, _ to: Int32, _ kind: UInt8, _ reason: EdgeReason?) {
        guard from != to else { return }
        var index: Int32 = -1
        if let reason {
            index = Int32(reasons.count)
            reasons.append(reason)
        }
        edges.append(RawEdge(from: from, to: to, kind: kind, reason: index))
    }

    // MARK: Values: list-append and rw-register

    struct ReadRef {
        var txn: Int32
        var op: Int32
        var external: Bool
    }

    struct AppendRecord {
        var txn: Int32
        var value: Int
        var isFinal: Bool
        var observed = false
    }

    struct ListKey {
        var key: Int
        var writers: [Int: Int32] = [:]
        var appends: [Int32] = []
        var reads: [ReadRef] = []
    }

    struct WriteRecord {
        var txn: Int32
        var value: Int
        var isFinal: Bool
    }

    struct RegisterKey {
        var key: Int
        var writers: [Int: Int32] = [:]
        var reads: [ReadRef] = []
        /// Version read (nil: the initial one) → the ok transactions that read it, then wrote the
        /// key (and the value they left).
        var overwriters: [Int?: [(txn: Int32, value: Int)]] = [:]
    }

    func list(_ ref: ReadRef) -> [Int] {
        if case .read(_, .list(let list)) = transactions[Int(ref.txn)].ops[Int(ref.op)] { return list }
        return []
    }

    func registerValue(_ ref: ReadRef) -> Int? {
        if case .read(_, .register(let value)) = transactions[Int(ref.txn)].ops[Int(ref.op)] { return value }
        return nil
    }

    mutating func inferFromValues() {
        var listIDs: [Int: Int] = [:]
        var registerIDs: [Int: Int] = [:]
        var listKeys: [ListKey] = []
        var registerKeys: [RegisterKey] = []
        var appendRecords: [AppendRecord] = []
        var writeRecords: [WriteRecord] = []
        var untypedReads: [(key: Int, ref: ReadRef)] = []

        func listID(_ key: Int) -> Int {
            if let id = listIDs[key] { return id }
            listIDs[key] = listKeys.count
            listKeys.append(ListKey(key: key))
            return listKeys.count - 1
        }
        func registerID(_ key: Int) -> Int {
            if let id = registerIDs[key] { return id }
            registerIDs[key] = registerKeys.count
            registerKeys.append(RegisterKey(key: key))
            return registerKeys.count - 1
        }

        // One pass over the transactions: writers, reads, internal consistency.
        for transaction in transactions {
            let txn = Int32(transaction.id)
            let ops = transaction.ops
            for (position, op) in ops.enumerated() {
                switch op {
                case .append(let key, let value):
                    let id = listID(key)
                    let isFinal = !ops[(position + 1)...].contains { if case .append(key, _) = $0 { true } else { false } }
                    if listKeys[id].writers[value] == nil {
                        listKeys[id].writers[value] = Int32(appendRecords.count)
                    }
                    listKeys[id].appends.append(Int32(appendRecords.count))
                    appendRecords.append(AppendRecord(txn: txn, value: value, isFinal: isFinal))
                case .write(let key, let value):
                    let id = registerID(key)
                    let isFinal = !ops[(position + 1)...].contains { if case .write(key, _) = $0 { true } else { false } }
                    if registerKeys[id].writers[value] == nil {
                        registerKeys[id].writers[value] = Int32(writeRecords.count)
                    }
                    writeRecords.append(WriteRecord(txn: txn, value: value, isFinal: isFinal))
                case .read(let key, let value):
                    guard transaction.status == .ok else { continue }
                    let external = !ops[..<position].contains { $0.key == key }
                    let ref = ReadRef(txn: txn, op: Int32(position), external: external)
                    switch value {
                    case .list(let list):
                        listKeys[listID(key)].reads.append(ref)
                        checkInternalList(transaction, position: position, key: key, read: list)
                    case .register(let register):
                        let id = registerID(key)
                        if external { registerKeys[id].reads.append(ref) }
                        noteOverwrite(transaction, position: position, key: key, read: register, into: &registerKeys[id])
                        checkInternalRegister(transaction, position: position, key: key, read: register)
                    case nil:
                        untypedReads.append((key, ref))
                    }
                }
            }
        }
        // A null read is an empty list on a list-append key, the initial value on a register.
        for (key, ref) in untypedReads {
            let transaction = transactions[Int(ref.txn)]
            if let id = listIDs[key] {
                listKeys[id].reads.append(ref)
                checkInternalList(transaction, position: Int(ref.op), key: key, read: [])
            } else if let id = registerIDs[key] {
                if ref.external { registerKeys[id].reads.append(ref) }
                noteOverwrite(transaction, position: Int(ref.op), key: key, read: nil, into: &registerKeys[id])
                checkInternalRegister(transaction, position: Int(ref.op), key: key, read: nil)
            }
        }
        listKeyCount = listKeys.count
        registerKeyCount = registerKeys.count
        for id in listKeys.indices {
            analyzeList(listKeys[id], &appendRecords)
        }
        for id in registerKeys.indices {
            analyzeRegister(registerKeys[id], writeRecords)
        }
    }

    // MARK: Internal consistency

    mutating func checkInternalList(_ transaction: HistoryTransaction, position: Int, key: Int, read: [Int]) {
        var lastRead: [Int]? = nil
        var appended: [Int] = []
        for op in transaction.ops[..<position] where op.key == key {
            switch op {
            case .append(_, let value): appended.append(value)
            case .read(_, .list(let list)): lastRead = list; appended = []
            case .read(_, nil): lastRead = []; appended = []
            default: break
            }
        }
        let problem: String?
        if let lastRead {
            let expected = lastRead + appended
            problem = read == expected ? nil
                : "expected \(renderList(expected)) (its earlier read \(renderList(lastRead))" + (appended.isEmpty ? ")" : " and its appends \(renderList(appended)) since)")
        } else if !appended.isEmpty {
            problem = read.count >= appended.count && Array(read.suffix(appended.count)) == appended ? nil
                : "expected it to end with its own earlier appends \(renderList(appended))"
        } else {
            problem = nil
        }
        if let problem {
            let txn = Int32(transaction.id)
            collector.add(.internalInconsistency) {
                Anomaly(kind: .internalInconsistency, key: key,
                        explanation: "\(transaction.name) read key \(key) = \(renderList(read)) (micro-op \(position + 1)), but \(problem)",
                        transactions: [summary(txn)])
            }
        }
    }

    mutating func checkInternalRegister(_ transaction: HistoryTransaction, position: Int, key: Int, read: Int?) {
        var known: Int?? = .none
        var source = ""
        for op in transaction.ops[..<position] where op.key == key {
            switch op {
            case .write(_, let value): known = .some(value); source = "its own earlier write of \(value)"
            case .read(_, .register(let value)): known = .some(value); source = "its earlier read of \(value)"
            case .read(_, nil): known = .some(nil); source = "its earlier read of null"
            default: break
            }
        }
        if case .some(let expected) = known, expected != read {
            let txn = Int32(transaction.id)
            let shown = read.map(String.init) ?? "null"
            collector.add(.internalInconsistency) {
                Anomaly(kind: .internalInconsistency, key: key,
                        explanation: "\(transaction.name) read key \(key) = \(shown) (micro-op \(position + 1)), but \(source) says \(expected.map(String.init) ?? "null")",
                        transactions: [summary(txn)])
            }
        }
    }

    func noteOverwrite(_ transaction: HistoryTransaction, position: Int, key: Int, read: Int?, into register: inout RegisterKey) {
        let ops = transaction.ops
        // Only the transaction's external read of the key, followed by a write of it.
        guard !ops[..<position].contains(where: { $0.key == key }) else { return }
        var written: Int?
        for op in ops[(position + 1)...] {
            if case .write(key, let value) = op { written = value }
        }
        if let written {
            register.overwriters[read, default: []].append((Int32(transaction.id), written))
        }
    }

    // MARK: list-append

    mutating func analyzeList(_ data: ListKey, _ appends: inout [AppendRecord]) {
        guard !data.reads.isEmpty else { return }
        let key = data.key
        var longestRef = data.reads[0]
        var longest = list(longestRef)
        for ref in data.reads.dropFirst() {
            let candidate = list(ref)
            if candidate.count > longest.count {
                longest = candidate
                longestRef = ref
            }
        }
        var broken = false
        var prefixReads: [ReadRef] = []
        prefixReads.reserveCapacity(data.reads.count)
        for ref in data.reads {
            let read = list(ref)
            let isPrefix = read.withUnsafeBytes { a in
                longest.withUnsafeBytes { b in a.count <= b.count && (a.count == 0 || memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0) }
            }
            if isPrefix {
                prefixReads.append(ref)
                continue
            }
            broken = true
            let (reader, other) = (ref.txn, longestRef.txn)
            collector.add(.incompatibleOrder) {
                let divergence = zip(read, longest).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(read.count, longest.count)
                func at(_ list: [Int]) -> String { divergence < list.count ? "\(list[divergence])" : "nothing" }
                return Anomaly(kind: .incompatibleOrder, key: key,
                               explanation: "key \(key): \(name(reader)) read \(renderList(read)) and \(name(other)) read \(renderList(longest)); neither is a prefix of the other: at position \(divergence + 1), \(name(reader)) has \(at(read)) and \(name(other)) \(at(longest))",
                               transactions: [summary(reader), summary(other)])
            }
            checkElements(of: read, key: key, data: data, appends: &appends) { _ in ref }
        }
        // Reads sorted by length: the shortest read showing a position is its witness.
        prefixReads.sort { (list($0).count, $0.txn) < (list($1).count, $1.txn) }
        let lengths = prefixReads.map { list($0).count }
        func witness(_ position: Int) -> ReadRef {
            var low = 0, high = lengths.count
            while low < high {
                let middle = (low + high) / 2
                if lengths[middle] > position { high = middle } else { low = middle + 1 }
            }
            return low < prefixReads.count ? prefixReads[low] : longestRef
        }

        // Duplicates in the version order.
        var seen: [Int: Int] = [:]
        seen.reserveCapacity(longest.count)
        for (position, element) in longest.enumerated() {
            if let first = seen[element] {
                broken = true
                let reader = witness(position).txn
                let shown = list(witness(position))
                collector.add(.duplicateElements) {
                    Anomaly(kind: .duplicateElements, key: key,
                            explanation: "\(name(reader)) read key \(key) = \(renderList(shown)), in which \(element) appears at positions \(first + 1) and \(position + 1)",
                            transactions: [summary(reader)])
                }
            } else {
                seen[element] = position
            }
        }
        checkElements(of: longest, key: key, data: data, appends: &appends, reader: witness)
        guard !broken else { return }

        // ww: consecutive elements of the version order.
        func writer(_ element: Int) -> AppendRecord? {
            guard let record = data.writers[element] else { return nil }
            let found = appends[Int(record)]
            return transactions[Int(found.txn)].status == .fail ? nil : found
        }
        if longest.count > 1 {
            var previous = writer(longest[0])
            for position in 1..<longest.count {
                let current = writer(longest[position])
                if let previous, let current, previous.txn != current.txn {
                    addEdge(previous.txn, current.txn, EdgeKind.ww,
                            EdgeReason(source: .listWW, key: key, first: longest[position - 1], second: longest[position],
                                       length: 0, witness: witness(position).txn, initial: false))
                }
                previous = current
            }
        }
        // wr and rw: each transaction's external read.
        for ref in data.reads where ref.external {
            let read = list(ref)
            if let last = read.last, let record = writer(last), record.txn != ref.txn {
                addEdge(record.txn, ref.txn, EdgeKind.wr,
                        EdgeReason(source: .listWR, key: key, first: last, second: 0, length: read.count, witness: -1, initial: false))
                if !record.isFinal {
                    let (reader, author) = (ref.txn, record.txn)
                    collector.add(.g1b) {
                        Anomaly(kind: .g1b, key: key,
                                explanation: "\(name(reader)) read key \(key) = \(renderList(read)), ending in \(last), an intermediate append of \(name(author)), which appended to key \(key) again afterwards",
                                transactions: [summary(author), summary(reader)])
                    }
                }
            }
            if read.count < longest.count, let record = writer(longest[read.count]), record.txn != ref.txn {
                addEdge(ref.txn, record.txn, EdgeKind.rw,
                        EdgeReason(source: .listRW, key: key, first: read.last ?? 0, second: longest[read.count],
                                   length: read.count, witness: witness(read.count).txn, initial: false))
            }
        }
        // Lost appends: committed, never read, though a read of the key began after it completed.
        var byInvoke: [ReadRef]? = nil
        for record in data.appends {
            let append = appends[Int(record)]
            let transaction = transactions[Int(append.txn)]
            guard !append.observed, transaction.status == .ok, let completed = transaction.completionTime else { continue }
            if byInvoke == nil {
                byInvoke = data.reads.sorted { (transactions[Int($0.txn)].invokeTime, $0.txn) < (transactions[Int($1.txn)].invokeTime, $1.txn) }
            }
            let sorted = byInvoke!
            var low = 0, high = sorted.count
            while low < high {
                let middle = (low + high) / 2
                if transactions[Int(sorted[middle].txn)].invokeTime > completed { high = middle } else { low = middle + 1 }
            }
            guard low < sorted.count else { continue }
            let later = sorted[low]
            let read = list(later)
            let (author, reader, value) = (append.txn, later.txn, append.value)
            collector.add(.lostAppend) {
                Anomaly(kind: .lostAppend, key: key,
                        explanation: "\(name(author)) appended \(value) to key \(key) and committed (completed at index \(transaction.completion!.index)), but \(name(reader)), invoked later (index \(transactions[Int(reader)].invoke.index)), read \(renderList(read)) without it, and no read of key \(key) ever contained it",
                        transactions: [summary(author), summary(reader)])
            }
        }
    }

    /// Garbage reads, aborted reads (G1a) and observed info writes among a read's elements.
    mutating func checkElements(of read: [Int], key: Int, data: ListKey, appends: inout [AppendRecord], reader: (Int) -> ReadRef) {
        for (position, element) in read.enumerated() {
            guard let record = data.writers[element] else {
                let ref = reader(position)
                let shown = list(ref)
                collector.add(.garbageRead) {
                    Anomaly(kind: .garbageRead, key: key,
                            explanation: "\(name(ref.txn)) read key \(key) = \(renderList(shown)), containing \(element), which no transaction tried to append to key \(key)",
                            transactions: [summary(ref.txn)])
                }
                continue
            }
            appends[Int(record)].observed = true
            let author = appends[Int(record)].txn
            switch transactions[Int(author)].status {
            case .fail:
                let ref = reader(position)
                let shown = list(ref)
                collector.add(.g1a) {
                    Anomaly(kind: .g1a, key: key,
                            explanation: "\(name(ref.txn)) read key \(key) = \(renderList(shown)), containing \(element), which \(name(author)) appended in a transaction that failed",
                            transactions: [summary(author), summary(ref.txn)])
                }
            case .info:
                included[Int(author)] = true
            case .ok:
                break
            }
        }
    }

    // MARK: rw-register

    mutating func analyzeRegister(_ data: RegisterKey, _ writes: [WriteRecord]) {
        let key = data.key
        func writer(_ value: Int) -> WriteRecord? {
            data.writers[value].map { writes[Int($0)] }
        }
        for ref in data.reads {
            let value = registerValue(ref)
            if let value {
                if let record = writer(value) {
                    switch transactions[Int(record.txn)].status {
                    case .fail:
                        let (author, reader) = (record.txn, ref.txn)
                        collector.add(.g1a) {
                            Anomaly(kind: .g1a, key: key,
                                    explanation: "\(name(reader)) read key \(key) = \(value), which \(name(author)) wrote in a transaction that failed",
                                    transactions: [summary(author), summary(reader)])
                        }
                    case .info, .ok:
                        included[Int(record.txn)] = true
                        if record.txn != ref.txn {
                            addEdge(record.txn, ref.txn, EdgeKind.wr,
                                    EdgeReason(source: .registerWR, key: key, first: value, second: 0, length: 0, witness: -1, initial: false))
                            if !record.isFinal {
                                let (author, reader) = (record.txn, ref.txn)
                                collector.add(.g1b) {
                                    Anomaly(kind: .g1b, key: key,
                                            explanation: "\(name(reader)) read key \(key) = \(value), an intermediate write of \(name(author)), which wrote key \(key) again afterwards",
                                            transactions: [summary(author), summary(reader)])
                                }
                            }
                        }
                    }
                } else {
                    let reader = ref.txn
                    collector.add(.garbageRead) {
                        Anomaly(kind: .garbageRead, key: key,
                                explanation: "\(name(reader)) read key \(key) = \(value), which no transaction tried to write to key \(key)",
                                transactions: [summary(reader)])
                    }
                }
            }
            // rw: whoever read this version and overwrote it follows every reader of it.
            for (overwriter, written) in data.overwriters[value] ?? [] where overwriter != ref.txn {
                addEdge(ref.txn, overwriter, EdgeKind.rw,
                        EdgeReason(source: .registerRW, key: key, first: value ?? 0, second: written, length: 0, witness: -1, initial: value == nil))
            }
        }
        for (version, overwriters) in data.overwriters {
            if let version, let record = writer(version), transactions[Int(record.txn)].status != .fail {
                for (overwriter, written) in overwriters where overwriter != record.txn {
                    addEdge(record.txn, overwriter, EdgeKind.ww,
                            EdgeReason(source: .registerWW, key: key, first: version, second: written, length: 0, witness: -1, initial: false))
                }
            }
            if overwriters.count >= 2 {
                let involved = overwriters.map(\.txn)
                let shown = version.map(String.init) ?? "null (its initial value)"
                collector.add(.lostUpdate) {
                    Anomaly(kind: .lostUpdate, key: key,
                            explanation: "\(involved.map(name).joined(separator: ", ")) all read key \(key) = \(shown) and then wrote key \(key) (\(overwriters.map { String($0.value) }.joined(separator: ", "))): all but one of the updates is lost",
                            transactions: involved.map(summary))
                }
            }
        }
    }

    // MARK: Real time and process order

    /// Realtime edges, as Elle builds them: walking invocations and completions in time order,
    /// each invocation is linked from the current frontier of completed transactions; a
    /// completion removes from the frontier the transactions its own invocation was linked from
    /// (they are now implied through it) and joins it. Process order edges link each process's
    /// ok transactions to its next transaction.
    mutating func addRealtimeEdges() {
        struct Event: Comparable {
            var time: Int
            var phase: Int  // 0 invoke, 1 completion: equal times are concurrent
            var txn: Int32
            static func < (a: Event, b: Event) -> Bool { (a.time, a.phase, a.txn) < (b.time, b.phase, b.txn) }
        }
        var events: [Event] = []
        events.reserveCapacity(2 * transactions.count)
        for transaction in transactions where included[transaction.id] {
            events.append(Event(time: transaction.invokeTime, phase: 0, txn: Int32(transaction.id)))
            if transaction.status == .ok, let completed = transaction.completionTime {
                events.append(Event(time: completed, phase: 1, txn: Int32(transaction.id)))
            }
        }
        events.sort()
        var frontier: [Int32] = []
        var linkedFrom = [[Int32]](repeating: [], count: transactions.count)
        var mark = [Int32](repeating: -1, count: transactions.count)
        for event in events {
            if event.phase == 0 {
                for predecessor in frontier {
                    addEdge(predecessor, event.txn, EdgeKind.rt, nil)
                }
                linkedFrom[Int(event.txn)] = frontier
            } else {
                let implied = linkedFrom[Int(event.txn)]
                if !implied.isEmpty {
                    for txn in implied { mark[Int(txn)] = event.txn }
                    frontier.removeAll { mark[Int($0)] == event.txn }
                    linkedFrom[Int(event.txn)] = []
                }
                frontier.append(event.txn)
            }
        }
        var lastOK: [Int: Int32] = [:]
        for transaction in transactions where included[transaction.id] {
            let txn = Int32(transaction.id)
            if let previous = lastOK[transaction.process] {
                addEdge(previous, txn, EdgeKind.rt, nil)
            }
            if transaction.status == .ok { lastOK[transaction.process] = txn }
        }
    }
}

// MARK: - Collecting anomalies

/// A class, so that adding an anomaly from inside the inference's methods does not overlap
/// with the closures' reads of the inference.
final class AnomalyCollector {
    let maxExamples: Int
    var counts: [AnomalyKind: Int] = [:]
    var examples: [AnomalyKind: [Anomaly]] = [:]

    init(maxExamples: Int) {
        self.maxExamples = max(0, maxExamples)
    }

    /// Counts one anomaly of `kind`; builds its description only while examples are wanted.
    func add(_ kind: AnomalyKind, _ make: () -> Anomaly) {
        counts[kind, default: 0] += 1
        if examples[kind, default: []].count < maxExamples {
            examples[kind, default: []].append(make())
        }
    }
}
