import Foundation

/// The anomaly classes the checker reports, with Elle's names.
public enum AnomalyKind: String, Sendable, Hashable, Codable, CodingKeyRepresentable, CaseIterable, Comparable {
    /// Write cycle: a cycle of ww edges only.
    case g0 = "G0"
    /// Aborted read: a read of a value written by a transaction that failed.
    case g1a = "G1a"
    /// Intermediate read: a read of a value its writer overwrote later in the same transaction.
    case g1b = "G1b"
    /// Circular information flow: a cycle of ww and wr edges, at least one wr.
    case g1c = "G1c"
    /// Read skew and the like: a cycle with exactly one rw (anti-dependency) edge.
    case gSingle = "G-single"
    /// A cycle with two or more rw edges (write skew and the like).
    case g2Item = "G2-item"
    /// G0 that needs at least one realtime edge (violates strict serializability only).
    case g0Realtime = "G0-realtime"
    /// G1c that needs at least one realtime edge (violates strict serializability only).
    case g1cRealtime = "G1c-realtime"
    /// G-single that needs at least one realtime edge (violates strict serializability only).
    case gSingleRealtime = "G-single-realtime"
    /// G2-item that needs at least one realtime edge (violates strict serializability only).
    case g2ItemRealtime = "G2-item-realtime"
    /// A read that does not reflect the transaction's own earlier writes or reads of the key.
    case internalInconsistency = "internal"
    /// An element twice in one read list.
    case duplicateElements = "duplicate-elements"
    /// Two reads of a key, neither a prefix of the other.
    case incompatibleOrder = "incompatible-order"
    /// A read of a value no transaction tried to write.
    case garbageRead = "garbage-read"
    /// A committed append no read ever saw, though a read of the key began after it completed.
    case lostAppend = "lost-append"
    /// Two committed transactions read the same version of a register and both wrote it.
    case lostUpdate = "lost-update"

    /// Whether the class is a cycle of the dependency graph.
    public var isCycle: Bool {
        switch self {
        case .g0, .g1c, .gSingle, .g2Item, .g0Realtime, .g1cRealtime, .gSingleRealtime, .g2ItemRealtime: true
        default: false
        }
    }

    /// Whether the class needs real time (it violates strict serializability, not serializability).
    public var isRealtime: Bool {
        switch self {
        case .g0Realtime, .g1cRealtime, .gSingleRealtime, .g2ItemRealtime, .lostAppend: true
        default: false
        }
    }

    /// Orders the classes as they are declared (`allCases`): G0 to G2-item, their realtime
    /// forms, then the anomalies about one key; reports list classes in this order.
    ///
    /// - Parameters:
    ///   - a: the class compared.
    ///   - b: the class it is compared with.
    public static func < (a: AnomalyKind, b: AnomalyKind) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

/// A transaction as a report shows it.
public struct TransactionSummary: Sendable, Hashable, Codable, CustomStringConvertible {
    /// `T` and the invoke's index.
    public let name: String
    /// The invoke's index.
    public let index: Int
    /// The completion's index (nil when it never completed).
    public let completionIndex: Int?
    /// The client process that ran it.
    public let process: Int
    /// Its outcome (`info` also when it never completed).
    public let status: TransactionStatus
    /// The micro-ops (the completion's for ok), long lists shortened.
    public let ops: String

    init(_ transaction: HistoryTransaction) {
        name = transaction.name
        index = transaction.invoke.index
        completionIndex = transaction.completion?.index
        process = transaction.process
        status = transaction.status
        ops = "[" + transaction.ops.map { $0.text(abbreviated: true) }.joined(separator: ", ") + "]"
    }

    /// One line: the name, process, outcome, where it was invoked and completed, and the micro-ops.
    public var description: String {
        let completed = completionIndex.map { ", completed at index \($0)" } ?? ", never completed"
        return "\(name) (process \(process), \(status.rawValue), invoked at index \(index)\(completed)): \(ops)"
    }
}

/// One edge of a reported cycle.
public struct CycleStep: Sendable, Hashable, Codable {
    /// The invoke index of the transaction the edge leaves.
    public let from: Int
    /// The invoke index of the transaction the edge reaches.
    public let to: Int
    /// `ww`, `wr`, `rw` or `realtime`.
    public let relation: String
    /// Why the edge exists, e.g. "T12 ww-> T40: T40 appended 7 after T12's 5 to key 3, per the read by T55".
    public let explanation: String
}

/// One anomaly found.
public struct Anomaly: Sendable, Hashable, Codable, CustomStringConvertible {
    /// The anomaly's class.
    public let kind: AnomalyKind
    /// The key, for anomalies about one key.
    public let key: Int?
    /// What is wrong, in a sentence.
    public let explanation: String
    /// The transactions involved; for a cycle, in cycle order.
    public let transactions: [TransactionSummary]
    /// For a cycle: its edges, each with the reason it exists; empty otherwise.
    public let cycle: [CycleStep]

    init(kind: AnomalyKind, key: Int?, explanation: String, transactions: [TransactionSummary], cycle: [CycleStep] = []) {
        self.kind = kind
        self.key = key
        self.explanation = explanation
        self.transactions = transactions
        self.cycle = cycle
    }

    /// The involved transactions' invoke indices.
    public var indices: [Int] { transactions.map(\.index) }

    /// The class and explanation, then one indented line per transaction and per cycle edge.
    public var description: String {
        var lines = ["\(kind.rawValue): \(explanation)"]
        for transaction in transactions { lines.append("    \(transaction)") }
        for step in cycle { lines.append("    \(step.explanation)") }
        return lines.joined(separator: "\n")
    }
}

/// A nemesis event, as the report lists it.
public struct NemesisSummary: Sendable, Hashable, Codable {
    /// The event's operation index in the history.
    public let index: Int
    /// The fault's name (`"crash"`, `"restart"`, ...).
    public let f: String
    /// The operation's type (usually `info`).
    public let type: OperationType
    /// The fault's argument, e.g. the node it hit (`null` when it has none).
    public let value: JSONValue
    /// When it happened, in monotonic nanoseconds (``CheckReport/startTime`` is the history's start).
    public let time: Int
}

/// What ``check(history:options:)`` found.
public struct CheckReport: Sendable, Codable, CustomStringConvertible {
    /// Whether no anomaly of any class was found.
    public let isValid: Bool
    /// Committed transactions.
    public let okCount: Int
    /// Transactions certainly not committed.
    public let failCount: Int
    /// Transactions with an unknown outcome (including those never completed).
    public let infoCount: Int
    /// Info transactions counted as committed because a write of theirs was read.
    public let observedInfoCount: Int
    /// Nemesis (fault) events in the history.
    public let nemesisCount: Int
    /// Every nemesis event, in history order.
    public let nemesisEvents: [NemesisSummary]
    /// The time of the history's first operation (nemesis times are shown relative to it).
    public let startTime: Int
    /// Keys seen with list-append micro-ops.
    public let listAppendKeyCount: Int
    /// Keys seen with rw-register micro-ops.
    public let registerKeyCount: Int
    /// How many anomalies of each class were found (cycle classes: one per strongly connected
    /// component of the class's relations where a cycle was found, as Elle counts them).
    public let anomalyCounts: [AnomalyKind: Int]
    /// Up to ``CheckOptions/maxExamples`` examples of each class found.
    public let anomalies: [AnomalyKind: [Anomaly]]
    /// Cycle classes whose search ran out of budget (more cycles of them may exist).
    public let incompleteSearches: [AnomalyKind]

    /// The classes found, in the order of `AnomalyKind.allCases`.
    public var anomalyKinds: [AnomalyKind] { anomalyCounts.keys.sorted() }

    /// Counts, then each class's examples with their explanations.
    public var description: String {
        var lines: [String] = []
        let total = okCount + failCount + infoCount
        var summary = "\(total) transactions: \(okCount) ok, \(failCount) fail, \(infoCount) info"
        if infoCount > 0 { summary += " (\(observedInfoCount) of them observed, so counted as committed)" }
        summary += "; \(listAppendKeyCount) list-append key\(listAppendKeyCount == 1 ? "" : "s"), \(registerKeyCount) register key\(registerKeyCount == 1 ? "" : "s")"
        lines.append(summary)
        if nemesisCount > 0 {
            let start = startTime
            let shown = nemesisEvents.prefix(20).map { "\($0.f) (index \($0.index), +\(String(format: "%.3f", Double($0.time - start) / 1e9)) s)" }
            lines.append("\(nemesisCount) nemesis event\(nemesisCount == 1 ? "" : "s"): " + shown.joined(separator: ", ") + (nemesisCount > 20 ? ", ..." : ""))
        }
        if isValid {
            lines.append("valid: no anomalies found (the history is strictly serializable as far as its dependencies can be inferred)")
        } else {
            let total = anomalyCounts.values.reduce(0, +)
            lines.append("INVALID: \(total) anomal\(total == 1 ? "y" : "ies"): " + anomalyKinds.map { "\($0.rawValue) \(anomalyCounts[$0]!)" }.joined(separator: ", "))
        }
        if !incompleteSearches.isEmpty {
            lines.append("note: the cycle search ran out of budget for " + incompleteSearches.map(\.rawValue).joined(separator: ", ") + "; more cycles of these classes may exist")
        }
        for kind in anomalyKinds {
            let examples = anomalies[kind] ?? []
            lines.append("")
            lines.append("\(kind.rawValue): \(anomalyCounts[kind]!) found" + (examples.count < anomalyCounts[kind]! ? ", \(examples.count) shown" : ""))
            for (number, anomaly) in examples.enumerated() {
                lines.append("  \(number + 1). \(anomaly.explanation)")
                for transaction in anomaly.transactions { lines.append("       \(transaction)") }
                for step in anomaly.cycle { lines.append("       \(step.explanation)") }
            }
        }
        return lines.joined(separator: "\n")
    }

    /// The report as JSON (keys sorted).
    public func json(pretty: Bool = true) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? encoder.encode(self) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }
}

extension Inference {
    func report() -> CheckReport {
        let counts = collector.counts
        let ok = transactions.filter { $0.status == .ok }.count
        let fail = transactions.filter { $0.status == .fail }.count
        let info = transactions.count - ok - fail
        let observed = transactions.filter { $0.status == .info && included[$0.id] }.count
        let nemesis = history.nemesisEvents.map { event in
            let value: JSONValue = if case .json(let json) = event.value { json } else { .null }
            return NemesisSummary(index: event.index, f: event.f, type: event.type, value: value, time: event.time)
        }
        return CheckReport(isValid: counts.isEmpty, okCount: ok, failCount: fail, infoCount: info, observedInfoCount: observed,
                           nemesisCount: nemesis.count, nemesisEvents: nemesis, startTime: history.operations.map(\.time).min() ?? 0,
                           listAppendKeyCount: listKeyCount, registerKeyCount: registerKeyCount,
                           anomalyCounts: counts, anomalies: collector.examples, incompleteSearches: incompleteSearches)
    }
}
