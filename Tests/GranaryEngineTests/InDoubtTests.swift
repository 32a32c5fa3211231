import GranaryWorkloads
import Testing

/// The benchmark invariants accept exactly the states recovery may leave: any subset of the
/// transactions in doubt applied, and nothing else.
@Suite("Transactions in doubt in the benchmark invariants")
struct InDoubtTests {
    @Test("a difference is explained only by a subset of the in-doubt deltas")
    func subsets() {
        #expect(InDoubt.explains(0, by: []))
        #expect(!InDoubt.explains(1, by: []), "with nothing in doubt, every difference is a violation")
        #expect(InDoubt.explains(1, by: [1]))
        #expect(!InDoubt.explains(-1, by: [1]))
        #expect(InDoubt.explains(-300, by: [-500, 200, 7]))
        #expect(InDoubt.explains(-293, by: [-500, 200, 7]))
        #expect(!InDoubt.explains(-299, by: [-500, 200, 7]), "-299 is no subset sum of -500, 200, 7")
        #expect(!InDoubt.explains(2, by: [1, 0, 0]), "one insert in doubt explains one row, not two")
    }

    @Test("past 20 non-zero deltas, the range between their negative and positive sums")
    func many() {
        let deltas = [Int64](repeating: 1, count: 30) + [-2]
        #expect(InDoubt.explains(30, by: deltas))
        #expect(InDoubt.explains(-2, by: deltas))
        #expect(!InDoubt.explains(31, by: deltas))
        #expect(!InDoubt.explains(-3, by: deltas))
    }
}
