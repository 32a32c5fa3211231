import ArgumentParser
import Foundation
import GranaryCheck

/// `granary check`: the strict-serializability checker. `granary check FILE` checks a history
/// file (the default subcommand, `history`).
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a transaction history for strict serializability (an Elle-like checker).",
        discussion: """
            A history is JSON Lines, one operation per line: {"index": 7, "process": 2, \
            "type": "invoke"|"ok"|"fail"|"info", "f": "txn", "value": [["append", 5, 12], \
            ["r", 7, null]], "time": 123456789}; "process": "nemesis" marks fault events. \
            `granary check FILE` prints the anomalies found with their cycles and exits 1 if there \
            are any, 2 if the file cannot be read or is malformed.
            """,
        subcommands: [
            CheckHistoryCommand.self,
            GenerateHistoryCommand.self,
            // run: added by the workload runner
        ],
        defaultSubcommand: CheckHistoryCommand.self
    )
}

/// `granary check history FILE` (the default: `granary check FILE`).
struct CheckHistoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "history",
        abstract: "Check a history file; exit 1 if it has anomalies, 2 if it is unreadable or malformed.")

    @Argument(help: "The history file (JSON Lines).") var file: String
    @Flag(help: "Print the report as JSON.") var json = false
    @Option(help: "Examples shown per anomaly class (all are counted).") var maxExamples: Int = 5
    @Flag(help: "Print how long reading and checking took, to standard error.") var timing = false

    func validate() throws {
        guard maxExamples >= 0 else { throw ValidationError("--max-examples must be at least 0") }
    }

    func run() throws {
        let clock = ContinuousClock()
        let start = clock.now
        let history: History
        do {
            history = try History.load(path: file)
        } catch {
            FileHandle.standardError.write(Data("granary check: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let parsed = clock.now
        let report = GranaryCheck.check(history: history, options: CheckOptions(maxExamples: maxExamples))
        let checked = clock.now
        print(json ? report.json() : report.description)
        if timing {
            FileHandle.standardError.write(Data("granary check: read and parsed \(history.operations.count) operations in \(parsed - start), checked \(history.transactions.count) transactions in \(checked - parsed)\n".utf8))
        }
        if !report.isValid { throw ExitCode(1) }
    }
}

/// `granary check generate` (hidden): writes a valid, generated list-append history, to time
/// and try the checker on.
struct GenerateHistoryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Write a generated, strictly serializable list-append history (for timing the checker).",
        shouldDisplay: false)

    @Option(help: "The file to write.") var output: String
    @Option(help: "Transactions.") var transactions: Int = 100_000
    @Option(help: "Client processes.") var processes: Int = 10
    @Option(help: "Keys.") var keys: Int = 100
    @Option(help: "Nemesis events.") var nemesisEvents: Int = 4
    @Option(help: "Random seed.") var seed: UInt64 = 1

    func validate() throws {
        guard transactions >= 0, processes >= 1, keys >= 1, nemesisEvents >= 0 else {
            throw ValidationError("--transactions and --nemesis-events must be at least 0, --processes and --keys at least 1")
        }
    }

    func run() throws {
        let generator = HistoryGenerator(.init(transactions: transactions, processes: processes, keys: keys,
                                               nemesisEvents: nemesisEvents, seed: seed))
        let operations = generator.listAppend()
        let history = try History(operations: operations)
        do {
            try history.jsonLines().write(to: URL(fileURLWithPath: output))
        } catch {
            FileHandle.standardError.write(Data("granary check generate: cannot write \(output): \(error.localizedDescription)\n".utf8))
            throw ExitCode(2)
        }
        print("wrote \(operations.count) operations (\(history.transactions.count) transactions) to \(output)")
    }
}
